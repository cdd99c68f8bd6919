"""The resource manager: device inventory and memory leases."""
