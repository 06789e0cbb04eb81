"""The edge agent: cloud link, capability validation, Core Cycle, Modbus adapter."""
