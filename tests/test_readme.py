"""The README's quickstart runs as written (on the embedded default model)."""
import os
import re

import pytest

from helpers import run_child

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    text = open(README).read()
    code = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    script = tmp_path / "quickstart.py"
    script.write_text(f"import os\nos.chdir({str(tmp_path)!r})\n" + code)
    run_child(str(script), timeout=600)
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
