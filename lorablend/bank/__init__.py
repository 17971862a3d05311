"""The bank: its manifest, how it is built or imported (sources/), the matrices over it, the fitted operator,
its calibration, its verification, and its adapters combined."""

from lorablend.bank.manifest import Bank, BankEntry

__all__ = ["Bank", "BankEntry"]
