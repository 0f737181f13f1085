"""Latency-budgeted searches, each handed a latency model and an accuracy model."""

from hwnas.search.base import LatencyModel, Search, infeasible_error
from hwnas.search.evolution import EvolutionSearch
from hwnas.search.pcnas import PCNASSearch
from hwnas.search.random_search import RandomSearch
from hwnas.search.result import SearchResult

METHODS = {"evolution": EvolutionSearch, "pcnas": PCNASSearch, "random": RandomSearch}

__all__ = ["EvolutionSearch", "LatencyModel", "METHODS", "PCNASSearch", "RandomSearch",
           "Search", "SearchResult", "infeasible_error"]
