"""Fresh-process half of the save/load round trip: load an adapter onto a freshly built base
model and write its outputs and frozen projections for the parent test to compare."""
import sys

import torch

torch.set_num_threads(1)
import flylora  # noqa: E402,F401  (registers the methods)
from peft import PeftModel  # noqa: E402

from cases import CASES  # noqa: E402
from conftest import make_inputs, make_model, output_of  # noqa: E402

case_name, adapter_dir, out_path = sys.argv[1:4]
case = next(c for c in CASES if c.name == case_name)
model = PeftModel.from_pretrained(make_model(case.model), adapter_dir).eval()
with torch.no_grad():
    out = output_of(model, make_inputs(case.model))
buffers = {n: b.clone() for n, b in model.named_buffers() if ".flylora_A." in n}
torch.save({"out": out, "buffers": buffers}, out_path)
