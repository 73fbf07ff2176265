"""`FlyLoraConfig.bias_update_every`: "step" (update_routing_bias once per optimizer step) and
"micro_batch" (d_i += u·sign(mean(c) − c_i) after every training micro-batch's backward, from
that micro-batch's non-padding counts, with no call from the training loop)."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import flylora
from flylora.balance import routed_layers, update_routing_bias
from helpers import make_model, run_child

U = 0.01


def model_with(cadence: str, **kw):
    cfg = flylora.FlyLoraConfig(r=8, k=2, lora_alpha=16, projection_seed=5, bias_update_rate=U,
                                bias_update_every=cadence, **kw)
    return get_peft_model(make_model("llama"), cfg).train()


def batches(n: int = 3):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0  # padding must not count
        out.append((ids, mask))
    return out


def biases(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items() if "flylora_bias" in n}


def micro_batch_loop(model, data, step_every: int = 2, manual_update: bool = False):
    """A plain PyTorch loop with gradient accumulation `step_every`; it never calls
    update_routing_bias unless `manual_update` (then after every backward)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for i, (ids, mask) in enumerate(data):
        labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        if manual_update:
            update_routing_bias(model)
        if (i + 1) % step_every == 0:
            opt.step()
            opt.zero_grad()


def test_micro_batch_equals_an_update_after_every_backward():
    """"micro_batch" with no call in the loop == "step" with update_routing_bias after every backward,
    bit for bit (d and B), and d moved in all 3 micro-batches (|d_i| reaches 3u somewhere)."""
    data = batches(3)
    auto, manual = model_with("micro_batch"), model_with("step")
    micro_batch_loop(auto, data)
    micro_batch_loop(manual, data, manual_update=True)
    a, m = auto.state_dict(), manual.state_dict()
    for k in a:
        if "flylora_B" in k or "flylora_bias" in k:
            assert torch.equal(a[k], m[k]), k
    d = torch.stack(list(biases(auto).values()))
    assert float(d.abs().max()) == pytest.approx(3 * U)
    # every update consumed its counts: nothing pending, and each layer's load total is k x the
    # number of non-padding tokens of the 3 micro-batches (2·7 + 2·7 + 2·7 − 3·3 padded = 33)
    for _, layer in routed_layers(auto):
        assert float(layer.pending_counts["default"].sum()) == 0
        assert float(layer.load_totals["default"].sum()) == 2 * 33


def test_step_cadence_waits_for_update_routing_bias():
    """"step": backwards alone never move d; the per-step call does, once."""
    model = model_with("step")
    micro_batch_loop(model, batches(2))
    assert all(float(t.abs().sum()) == 0 for t in biases(model).values())
    update_routing_bias(model)
    d = torch.stack(list(biases(model).values()))
    assert float(d.abs().max()) == pytest.approx(U)


def test_no_update_in_eval_or_no_grad_or_before_backward():
    model = model_with("micro_batch")
    ids, mask = batches(1)[0]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # eval mode: no counting, no update
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)  # training forward, no backward yet
    assert all(float(t.abs().sum()) == 0 for t in biases(model).values())
    out.loss.backward()
    assert any(float(t.abs().sum()) > 0 for t in biases(model).values())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_updates_once_per_micro_batch(reentrant):
    """Checkpointing re-runs forwards inside backward (non-reentrant) or runs the counted forward
    only there (reentrant); either way d and B end exactly as without checkpointing."""
    data = batches(3)
    plain, ckpt = model_with("micro_batch"), model_with("micro_batch")
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    kw = "activation_checkpointing_kwargs" if enable.__name__.startswith("activation") else "gradient_checkpointing_kwargs"
    enable(**{kw: {"use_reentrant": reentrant}})
    if reentrant:
        ckpt.enable_input_require_grads()
    micro_batch_loop(plain, data)
    micro_batch_loop(ckpt, data)
    p, c = plain.state_dict(), ckpt.state_dict()
    for k in p:
        if "flylora_bias" in k:
            assert torch.equal(p[k], c[k]), k
        elif "flylora_B" in k:
            torch.testing.assert_close(p[k], c[k], atol=1e-6, rtol=1e-5)
    assert max(float(t.abs().max()) for t in biases(ckpt).values()) == pytest.approx(3 * U)  # 3 updates, not 6 or 0


def test_two_losses_one_backward_is_one_update():
    """Two forwards summed into one backward are one micro-batch: one update from the summed counts."""
    model = model_with("micro_batch")
    (a, ma), (b, mb) = batches(2)
    loss = model(input_ids=a, attention_mask=ma, labels=a).loss + model(input_ids=b, attention_mask=mb, labels=b).loss
    loss.backward()
    d = torch.stack(list(biases(model).values()))
    assert float(d.abs().max()) == pytest.approx(U)


def test_mixed_cadences_and_bad_value():
    """Per adapter: a "step" adapter beside a "micro_batch" one keeps its counts for the step call."""
    model = model_with("micro_batch")
    model.add_adapter("slow", flylora.FlyLoraConfig(r=8, k=2, projection_seed=6, bias_update_rate=U))
    model.base_model.set_adapter(["default", "slow"])
    ids, mask = batches(1)[0]
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    slow = [t for n, t in biases(model).items() if ".slow" in n]
    fast = [t for n, t in biases(model).items() if ".default" in n]
    assert all(float(t.abs().sum()) == 0 for t in slow) and any(float(t.abs().sum()) > 0 for t in fast)
    update_routing_bias(model, cadence="step")
    assert any(float(t.abs().sum()) > 0 for n, t in biases(model).items() if ".slow" in n)
    with pytest.raises(ValueError, match="bias_update_every='every'"):
        flylora.FlyLoraConfig(bias_update_every="every")
    with pytest.raises(ValueError, match="cadence='epoch'"):
        update_routing_bias(model, cadence="epoch")


def test_config_round_trip(tmp_path):
    model = model_with("micro_batch")
    model.save_pretrained(tmp_path)
    cfg = flylora.FlyLoraConfig.from_pretrained(str(tmp_path))
    assert cfg.bias_update_every == "micro_batch"


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")
def test_ddp_micro_batch_updates_agree_across_ranks(tmp_path):
    """2 gloo ranks, "micro_batch", 2 micro-batches per step, no update call in the loop: d and B
    identical on both ranks and equal to one process that backwards both halves together."""
    import cadence_ddp_child

    run_child("cadence_ddp_child.py", str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f) for f in ("rank0.pt", "rank1.pt"))
    single = cadence_ddp_child.single()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        if "flylora_bias" in k:
            assert torch.equal(r0[k], single[k]), k
        else:
            torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=1e-4)
    assert max(float(v.abs().max()) for k, v in r0.items() if "flylora_bias" in k) == pytest.approx(4 * 0.01)


def test_paper_recipes_use_the_official_cadence_and_loading():
    """recipes/paper/ (generate.py): FlyLoRA updates d per micro-batch; every base loads as the official
    scripts did (4-bit fp4, fp32 compute, fp16 storage of the rest)."""
    from pathlib import Path

    from flylora.pipeline.recipe import load_recipe

    files = sorted((Path(__file__).parents[1] / "recipes" / "paper").glob("*/*/*.yaml"))
    assert len(files) == 32
    for f in files:
        r = load_recipe(f)
        assert (r.model.quantization, r.model.compute_dtype, r.model.dtype) == ("fp4", "float32", "float16"), f
        if r.method.name == "flylora":
            assert r.method.config["bias_update_every"] == "micro_batch", f
