from .errors import RankshrinkError
