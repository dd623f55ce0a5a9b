#!/bin/sh
# openvpn's down script, as balenaOS's: the VPN is offline.
mkdir -p /run/openvpn/vpn_status
rm -f /run/openvpn/vpn_status/active
