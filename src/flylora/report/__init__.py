"""Reports: markdown tables (paper Tables 1/2 layout) and merge-drop plots from results.json."""
from .tables import load_results, markdown, table1, table2, write_report

__all__ = ["load_results", "markdown", "table1", "table2", "write_report"]
