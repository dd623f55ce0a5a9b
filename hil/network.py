"""How the rig host reaches the DUT over the network (SSH), and the DUT the rig host."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hil.registry import PartContext, Settings


class SshNetworkSettings(Settings):
    host: str = Field(description="DUT address as the rig host sees it")
    port: int = Field(22222, gt=0, lt=65536)
    host_address: str = Field(description="rig host address as the DUT sees it (NTP, API)")
    link: Literal["wired", "wifi"] = Field(
        "wired", description="how the DUT reaches the rig host: an Ethernet cable (the rig then "
        "offers the feature wired_network) or Wi-Fi")


class SshNetwork:
    Settings = SshNetworkSettings

    def __init__(self, settings: SshNetworkSettings, ctx: PartContext) -> None:
        self.settings = settings

    def ssh_endpoint(self) -> tuple[str, int]:
        return self.settings.host, self.settings.port

    @property
    def host_address(self) -> str:
        return self.settings.host_address

    def close(self) -> None:
        pass
