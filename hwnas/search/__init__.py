"""Latency-budgeted searches, each handed a latency model and an accuracy model."""

from hwnas.search.base import LatencyModel, Search, infeasible_error
from hwnas.search.crnas import CRNASSearch
from hwnas.search.evolution import EvolutionSearch
from hwnas.search.pcnas import PCNASSearch
from hwnas.search.random_search import RandomSearch
from hwnas.search.result import SearchResult

METHODS = {"evolution": EvolutionSearch, "pcnas": PCNASSearch, "random": RandomSearch,
           "crnas": CRNASSearch}

__all__ = ["CRNASSearch", "EvolutionSearch", "LatencyModel", "METHODS", "PCNASSearch", "RandomSearch",
           "Search", "SearchResult", "infeasible_error"]
