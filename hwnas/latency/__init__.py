"""The latency lookup table: rows and sidecar (`table`), the resumable sweep (`profile`),
pricing with calibration (`predict`), and predicted-vs-measured validation (`validate`)."""

from hwnas.latency.predict import Calibration, LutPredictor, fit_calibration
from hwnas.latency.table import LatencyTable, table_path, tables_dir

__all__ = ["Calibration", "LatencyTable", "LutPredictor", "fit_calibration", "table_path",
           "tables_dir"]
