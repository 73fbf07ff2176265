"""Fresh-process half of the save/load round trip: for every case folder under ROOT, load the
adapter onto a freshly built base model and write its outputs and frozen projections, for the
parent test to compare bit-for-bit."""
import os
import sys

import torch

torch.set_num_threads(1)
import flylora  # noqa: E402,F401  (registers the methods)
from peft import PeftModel  # noqa: E402

from cases import CASES  # noqa: E402
from conftest import make_inputs, make_model, output_of  # noqa: E402

root = sys.argv[1]
for case in CASES:
    adapter_dir = os.path.join(root, case.name)
    model = PeftModel.from_pretrained(make_model(case.model), adapter_dir).eval()
    with torch.no_grad():
        out = output_of(model, make_inputs(case.model))
    buffers = {n: b.clone() for n, b in model.named_buffers() if "_A." in n}
    torch.save({"out": out, "buffers": buffers}, os.path.join(adapter_dir, "child.pt"))
