"""Vision-side metrics: stream similarity on the vision tower, image-feature fidelity, sample images."""

from __future__ import annotations

import math

import pytest
import torch
from llava_tiny import tiny_llava
from prunekit_llava.images import SAMPLE_FILES, SAMPLE_IMAGES, data_dir, sample_images, to_pixel_values

import prunekit_core as pk
from prunekit_core.adapters.vision import feature_fidelity, image_features
from prunekit_core.ir.errors import CalibrationError


def _calibrated(model, n=4, length=16):
    adapter = pk.select_adapter(model)
    windows = torch.randint(3, 120, (n, length), generator=torch.Generator().manual_seed(0))
    ids, extra = adapter.calibration_inputs(model, windows)
    return ids, extra, pk.calibrate(model, ids, inputs=extra)


def test_sample_images_ship_with_the_wheel():
    for name, file in SAMPLE_FILES.items():  # files inside the installed package: no download
        assert (data_dir() / file).is_file(), name
    images = sample_images()
    assert len(images) == len(SAMPLE_IMAGES) >= 12
    assert all(im.ndim == 3 and im.shape[-1] == 3 and im.dtype.name == "uint8" for im in images)
    pv = to_pixel_values(images[:3], 32)
    assert pv.shape == (3, 3, 32, 32) and torch.isfinite(pv).all()


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_calibration_observes_the_vision_stream(tower):
    model = tiny_llava(tower)
    ids, extra, cal = _calibrated(model)
    assert (ids[:, 0] == model.config.image_token_id).all()
    assert set(cal.towers) == {"vision", "text"}
    patches = model.model.vision_tower.embeddings.position_embedding.num_embeddings  # CLS included
    assert cal.towers["vision"].tokens == ids.shape[0] * patches
    ir = pk.select_adapter(model).build_ir(model)
    vision_units = {b.id for b in ir.tower("vision").blocks} | {
        s.id for b in ir.tower("vision").blocks for s in b.sublayers
    }
    for metric in ("bi", "angular", "sublayer_drop"):
        values = pk.score(model, cal, metric).values
        scored = {u for u in values if u.startswith("vision.")}
        assert scored and scored <= vision_units
        assert all(math.isfinite(values[u]) for u in scored)


def test_block_similarity_matches_a_hand_computed_cosine():
    model = tiny_llava("clip")
    ids, extra, cal = _calibrated(model)
    layers = model.model.vision_tower.encoder.layers
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layers[1].register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, **extra)
    handle.remove()
    x_in, x_out = seen[0]
    want = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1).mean().item()
    assert cal.towers["vision"].block_cos["vision.blocks.1"] == pytest.approx(want, abs=1e-5)


def test_feature_fidelity():
    model = tiny_llava("clip", feature_layer=-2)
    pv = to_pixel_values(sample_images()[:3], 16)
    before = image_features(model, pv)
    assert before.shape == (3 * 4, 64)  # 4 patches per image, projected to the text width
    assert feature_fidelity(before, before) == pytest.approx(1.0)
    ir = pk.select_adapter(model).build_ir(model)

    def pruned(remove):
        m = tiny_llava("clip", feature_layer=-2)
        plan = pk.PrunePlan(fingerprint=pk.fingerprint(m, ir), remove=remove)
        return image_features(pk.apply_plan(m, plan).model, pv)

    assert torch.equal(pruned(["vision.blocks.3"]), before)  # the unused last layer: exact
    assert feature_fidelity(before, pruned(["vision.blocks.0"])) < 1 - 1e-6
    with pytest.raises(ValueError, match="shapes differ"):
        feature_fidelity(before, before[:-1])


def test_windows_too_short_for_an_image_are_refused():
    model = tiny_llava("clip")
    with pytest.raises(CalibrationError, match="cannot hold an image"):
        pk.select_adapter(model).calibration_inputs(model, torch.zeros((2, 4), dtype=torch.long))


def _reference_loss(model, ids, extra, vision=(), text=()):
    """Next-token loss of the unpruned model with those blocks bypassed by hooks (independent of prunekit)."""
    handles = [
        model.model.vision_tower.encoder.layers[i].register_forward_hook(lambda _m, args, _o: args[0])
        for i in vision
    ] + [
        model.model.language_model.layers[i].register_forward_hook(
            lambda _m, args, kwargs, _o: args[0] if args else kwargs["hidden_states"], with_kwargs=True
        )
        for i in text
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, **extra).logits[:, :-1].float()
    finally:
        for h in handles:
            h.remove()
    return float(
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    )


def test_removal_trials_measure_vision_units_with_the_images():
    from prunekit_core.scoring.calibration import TrialRunner

    model = tiny_llava("clip")
    ids, extra, _cal = _calibrated(model)
    runner = TrialRunner(model, pk.select_adapter(model), ids, inputs=extra)
    assert runner.base_loss == pytest.approx(_reference_loss(model, ids, extra), abs=1e-5)
    assert runner.loss(["text.blocks.2"]) == pytest.approx(
        _reference_loss(model, ids, extra, text=[2]), abs=1e-5
    )
    vision = runner.loss(["vision.blocks.1"])
    assert vision == pytest.approx(_reference_loss(model, ids, extra, vision=[1]), abs=1e-5)
    assert vision != pytest.approx(runner.base_loss, abs=1e-7)  # the images reach the loss
    runner.commit(["vision.blocks.1"])
    assert runner.current_loss == pytest.approx(vision, abs=1e-6)
    both = _reference_loss(model, ids, extra, vision=[1], text=[2])
    assert runner.loss(["text.blocks.2"]) == pytest.approx(
        both, abs=1e-5
    )  # full forwards after a vision commit
