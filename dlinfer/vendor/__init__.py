"""Vendors: per-device implementations of the op contract, and the registry that picks one per call.

``vendor_name`` (read by LMDeploy) is the name of the vendor serving the default device.
"""

from dlinfer.vendor.registry import (
    REGISTRY,
    Call,
    Capabilities,
    Registry,
    Vendor,
    clear_overrides,
    default_device_type,
    forced,
    get_vendor,
    pinned,
    preferred_weight_layout,
    register_vendor,
    restore,
    set_override,
    snapshot,
    unregister_vendor,
    vendor_for_device,
    vendors,
)

__all__ = ["REGISTRY", "Call", "Capabilities", "Registry", "Vendor", "clear_overrides", "default_device_type",
           "forced", "get_vendor", "pinned", "preferred_weight_layout", "register_vendor", "restore", "set_override",
           "snapshot", "unregister_vendor", "vendor_for_device", "vendors", "vendor_name"]


def __getattr__(name):
    if name == "vendor_name":
        return vendor_for_device(default_device_type())
    raise AttributeError(f"module 'dlinfer.vendor' has no attribute {name!r}")
