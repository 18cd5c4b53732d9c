"""transformers detectors (Deformable DETR, OWLv2) behind the detector adapter contract: detections equal a direct
decoding of the HF model's own outputs, the hooked maps and the MC path (shared prefix = S full passes), the
from_pretrained path on a local folder, and box- and image-level OOD metrics end to end through the console
scripts on the generated shapes set (small random-init networks, offline)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file
from torchvision.ops import batched_nms
from transformers.image_transforms import center_to_corners_format

from _cli import cli
from larex.extraction.hooks import capture_output, resolve_module
from larex.extraction.mc import mc_mode
from larex.extraction.producers.monte_carlo import MonteCarlo
from larex.models.detection.base import insert_mc_layer
from larex.models.detection.transformers_detr import DeformableDETRDetector
from larex.models.detection.transformers_owlv2 import OWLv2Detector, byte_tokens

CLASSES = ["circle", "square", "triangle"]
DETR_LAYER, OWL_LAYER = "model.model.input_proj.2", "patch_map"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one torch thread (as the console scripts run, OMP_NUM_THREADS=1) avoids thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 3, h: int = 160, w: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, h, w), generator=torch.Generator().manual_seed(seed))


def _reference(boxes_cxcywh, logits, size, conf, max_det, iou=None):
    """Per-image decoding in plain loops: sigmoid, best class > conf, (class-aware NMS), top max_det."""
    h, w = size
    rows = {k: [] for k in ("image_index", "boxes", "scores", "labels", "logits")}
    for b in range(logits.shape[0]):
        score, label = logits[b].float().sigmoid().max(-1)
        boxes = center_to_corners_format(boxes_cxcywh[b].float()) * torch.tensor([w, h, w, h])
        idx = torch.nonzero(score > conf).flatten()
        if iou is not None:
            idx = idx[batched_nms(boxes[idx], score[idx], label[idx], iou)]
        idx = idx[torch.argsort(score[idx], descending=True)][:max_det]
        for key, v in (("image_index", torch.full((len(idx),), b)), ("boxes", boxes[idx]), ("scores", score[idx]),
                       ("labels", label[idx]), ("logits", logits[b][idx].float())):
            rows[key].append(v)
    return {k: torch.cat(v) for k, v in rows.items()}


def _assert_same(det, ref):
    assert torch.equal(det.image_index.long(), ref["image_index"].long())
    assert torch.equal(det.labels.long(), ref["labels"].long())
    for key in ("boxes", "scores", "logits"):
        torch.testing.assert_close(getattr(det, key), ref[key], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ Deformable DETR
def test_deformable_detr_detections_are_the_hf_outputs_decoded(tmp_path):
    m = DeformableDETRDetector(num_classes=3).eval()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  DeformableDETRDetector(num_classes=3).state_dict().values()))
    x = _images()
    with torch.no_grad():
        out = m.model(pixel_values=x)  # the HF model itself (its default pixel mask: all ones)
    assert out.logits.shape == (3, 50, 3) and out.pred_boxes.shape == (3, 50, 4)
    torch.testing.assert_close(m(x).logits, out.logits)
    conf = float(out.logits.sigmoid().max(-1).values.median())  # keeps about half of the queries
    for max_det in (7, 40):  # the top-k, then the confidence threshold, is what limits the boxes
        with capture_output(resolve_module(m, DETR_LAYER)) as cap:
            det = m.detect(x, conf=conf, iou=0.7, max_det=max_det)
        assert cap.calls == 1 and cap.value.shape == (3, 64, 5, 5)  # C5 projection: d_model x 160/32 x 160/32
        _assert_same(det, _reference(out.pred_boxes, out.logits, (160, 160), conf, max_det))
        assert (len(det) == 21) if max_det == 7 else (21 < len(det) < 3 * 40)
    ref = _reference(out.pred_boxes, out.logits, (160, 160), conf, 7)
    # each box's features are its query's last decoder state, which the last class head maps to its logits
    det = m.detect(x, conf=conf, max_det=7)
    states = out.intermediate_hidden_states[:, -1]  # [B, Q, d_model]
    rows = (states[det.image_index][:, None] == det.features[:, None, None]).all(-1)  # [K, 1, Q]
    assert rows.any(-1).all() and det.features.shape == (21, 64)
    w, b = m.box_head()
    torch.testing.assert_close(det.features @ w.detach().T + b.detach(), det.logits, rtol=1e-5, atol=1e-5)

    # a local (or hub) checkpoint goes through from_pretrained; its labels must be the ID classes
    m.model.save_pretrained(tmp_path / "ckpt")
    loaded = DeformableDETRDetector(num_classes=3, pretrained=str(tmp_path / "ckpt"))
    _assert_same(loaded.detect(x, conf=conf, max_det=7), ref)
    with pytest.raises(ValueError, match="num_classes=null"):
        DeformableDETRDetector(num_classes=5, pretrained=str(tmp_path / "ckpt"))
    # or a safetensors state dict of the adapter replaces the random init
    from safetensors.torch import save_model

    save_model(m, str(tmp_path / "detr.safetensors"))  # tied heads are stored once
    _assert_same(DeformableDETRDetector(num_classes=3, seed=1, weights=str(tmp_path / "detr.safetensors")).detect(
        x, conf=conf, max_det=7), ref)


# ------------------------------------------------------------------------------------------------ OWLv2
def test_byte_tokens_are_deterministic_and_pool_at_eos():
    ids, mask = byte_tokens(["ab", "a much longer query than fits"], vocab_size=300, max_length=8)
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0].tolist() == [298, ord("a") + 1, ord("b") + 1, 299, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and mask[1].all()
    assert (ids[:, 0] > 0).all() and (ids.argmax(-1) == mask.sum(-1) - 1).all()  # eos = the highest id, pooled
    assert torch.equal(ids, byte_tokens(["ab", "a much longer query than fits"], 300, 8)[0])
    with pytest.raises(ValueError, match="vocabulary"):
        byte_tokens(["a"], vocab_size=100, max_length=8)


def test_owlv2_forward_and_detections_are_the_hf_model_decoded():
    m = OWLv2Detector(num_classes=3, queries=CLASSES).eval()
    for h, w in ((160, 160), (128, 160)):  # the config's input size, and one that interpolates the positions
        x = _images(h=h, w=w)
        q = len(CLASSES)
        with torch.no_grad():
            ref_out = m.model(input_ids=m.input_ids.repeat(3, 1), attention_mask=m.attention_mask.repeat(3, 1),
                              pixel_values=x, interpolate_pos_encoding=(h, w) != (160, 160))
            with capture_output(m.patch_map) as cap:
                out = m(x)
        assert cap.calls == 1 and cap.value.shape == (3, 64, h // 16, w // 16)  # the map covers the input
        p = (h // 16) * (w // 16)
        assert out.logits.shape == (3, p, q) and out.pred_boxes.shape == (3, p, 4)
        for key in ("logits", "pred_boxes", "objectness_logits"):
            torch.testing.assert_close(getattr(out, key), getattr(ref_out, key), rtol=1e-5, atol=1e-5)
    # well-scaled random init: boxes and scores differ per patch and image (not saturated)
    assert out.pred_boxes.std() > 0.01 and out.logits.sigmoid().std() > 0.01
    x = _images()
    with torch.no_grad():
        ref_out = m(x)
    conf = float(ref_out.logits.sigmoid().max(-1).values.median())
    _assert_same(m.detect(x, conf=conf, iou=0.3, max_det=9),
                 _reference(ref_out.pred_boxes, ref_out.logits, (160, 160), conf, 9, iou=0.3))
    m.nms = False
    _assert_same(m.detect(x, conf=conf, iou=0.3, max_det=9),
                 _reference(ref_out.pred_boxes, ref_out.logits, (160, 160), conf, 9))


def test_owlv2_pretrained_folder_uses_its_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    m = OWLv2Detector(num_classes=2, queries=["cat", "dog"], prompt="a photo of a {}")
    vocab = {"<pad>": 0, "[UNK]": 1, "a": 2, "photo": 3, "of": 4, "cat": 5, "dog": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    m.model.save_pretrained(tmp_path / "owl")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="[UNK]").save_pretrained(
        tmp_path / "owl")
    loaded = OWLv2Detector(num_classes=2, queries=["cat", "dog"], prompt="a photo of a {}",
                           pretrained=str(tmp_path / "owl"))
    assert loaded.input_ids.shape == (2, 16)  # padded to the text positions, as Owlv2Processor does
    assert loaded.input_ids[:, :5].tolist() == [[2, 3, 4, 2, 5], [2, 3, 4, 2, 6]]
    assert loaded(_images(n=1)).logits.shape == (1, 100, 2)
    with pytest.raises(ValueError, match="one query per ID class"):
        OWLv2Detector(num_classes=3, queries=["cat", "dog"])


# ------------------------------------------------------------------------------------------------ MC path
@pytest.mark.parametrize("family", ["deformable_detr", "owlv2"])
def test_mc_latents_with_a_shared_prefix_equal_full_passes(family):
    m, path = ((DeformableDETRDetector(num_classes=3), DETR_LAYER) if family == "deformable_detr"
               else (OWLv2Detector(num_classes=3, queries=CLASSES), OWL_LAYER))
    x, s = _images(n=2), 4
    with torch.no_grad():
        before = m.eval()(x).logits
    insert_mc_layer(m, path, "dropblock", 0.5, 3).eval()
    shared = MonteCarlo(path, mc_samples=s, seed=3).produce(m, x, None, torch.arange(2))["latent"]
    full = MonteCarlo(path, mc_samples=s, seed=3, share_prefix=False).produce(m, x, None, torch.arange(2))["latent"]
    assert shared.shape == (2, s, 64)
    torch.testing.assert_close(shared, full)
    assert (shared.std(1) > 0).any()  # the inserted DropBlock varies the samples
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, before)  # in eval the inserted MC layer is the identity
    if family == "owlv2":  # the heads also run on the S-fold rows the MC layer makes (class token repeated)
        mc = resolve_module(m, path).mc

        def expand(_mod, args):
            return (args[0].repeat_interleave(s, dim=0),)

        with torch.inference_mode(), mc_mode(m, samples=s, seed=3, mask_norm="expected"):
            handle = mc.register_forward_pre_hook(expand)
            try:
                once = m(x).logits
            finally:
                handle.remove()
            repeated = m(x.repeat_interleave(s, dim=0)).logits
        assert once.shape == (2 * s, 100, 3)
        torch.testing.assert_close(once, repeated, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ end to end
E2E = ["task=detection", "dataset=shapes", "progress=false", "device=cpu", "limit.fit=16", "limit.val=8",
       "limit.test=8", "limit.ood=8", "extract.batch_size=4", "hooked_layer.mc_samples=4",
       "task.boxes.predict_conf=0", "task.boxes.max_det=10", "postprocessor.lared.pca=4",
       "postprocessor.larem.pca=4", "baselines=[msp,energy]", "tracking.enabled=false", "evaluate.plots=false"]


def _shards(split_dir, part):
    return {k: v for p in split_dir.glob(f"{part}-*") for f in sorted(p.glob("shard-*.safetensors"))
            for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("model,hooked,layer,channels", [
    ("deformable_detr", "deformable_detr_input_proj", "input_proj", 64),
    ("owlv2", "owlv2_patch_map", "patch_map", 64)])
def test_transformers_detector_through_the_console_scripts(tmp_path, model, hooked, layer, channels):
    out = tmp_path / "out"
    args = [*E2E, f"output_root={out}", f"model={model}", f"hooked_layer={hooked}"]
    cli("larex-run", *args, cwd=tmp_path)  # one process for the stages (the YOLOv8 test runs them one by one)
    root = out / "detection" / "shapes" / model / layer
    df = pd.read_csv(root / "latest" / "metrics.csv")
    assert set(df["method"]) == {f"{lv}.{m}" for lv in ("box", "image") for m in ("lared", "larem", "msp", "energy")}
    rows = df[df["ood"] != "mean"]
    assert set(rows["ood"]) == {"shapes_near", "shapes_far"}
    assert rows["auroc"].between(0, 1).all() and np.isfinite(rows["auroc"]).all()

    extract = next(root.glob("extract-*"))
    for split in ("fit", "test", "ood/shapes_far"):
        boxes, mc = _shards(extract / split, "boxes"), _shards(extract / split, "mc")
        n = 16 if split == "fit" else 8
        # predict_conf=0: every image keeps max_det boxes, none is a no-object image
        assert boxes["no_object"].shape == (n,) and (boxes["no_object"] == 0).all()
        assert boxes["roi_latent"].shape == (n * 10, 4, channels)
        assert boxes["box_logits"].shape == (n * 10, 3) and len(boxes["box_scores"]) == n * 10
        images, counts = np.unique(boxes["image_index"], return_counts=True)
        assert len(images) == n and (counts == 10).all()
        assert (boxes["boxes"] >= 0).all() and (boxes["boxes"][:, 2:] <= 160).all()
        assert (boxes["boxes"][:, 2:] > boxes["boxes"][:, :2]).all()
        assert np.ptp(boxes["roi_latent"], axis=1).max() > 0
        assert mc["latent"].shape == (n, 4, channels)
        assert (np.ptp(mc["latent"], axis=1).max(-1) > 0).all()  # every image's latent varies over the S passes


def test_a_family_without_a_larex_trainer_fails_before_any_data_is_built():
    from larex.tasks.detection import Detection

    def no_data(split, raw=False):
        raise AssertionError("no dataset may be built for a model that cannot train")

    with pytest.raises(ValueError, match="no larex trainer.*model.train=null.*weights"):
        Detection().train_model(DeformableDETRDetector(num_classes=3), no_data, {"epochs": 1}, torch.device("cpu"),
                                "/nonexistent")
