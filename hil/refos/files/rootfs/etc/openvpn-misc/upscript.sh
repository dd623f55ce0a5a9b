#!/bin/sh
# openvpn's up script, as balenaOS's: the VPN is online (hostapp-update and rollback-tests
# read the marker). openvpn then drops to its user, whose down script removes it.
mkdir -p /run/openvpn/vpn_status
touch /run/openvpn/vpn_status/active
chown -R openvpn:openvpn /run/openvpn/vpn_status
