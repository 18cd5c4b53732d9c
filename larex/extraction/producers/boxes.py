"""Box rows of a detector: one deterministic forward, the kept boxes, their RoIAlign features over the hooked
map and S DropBlock samples of those features (the box-level LaREx protocol, no extra network forward).

Per batch (``x`` the network inputs, ``y`` the targets with each image's ``transform``, see
:mod:`larex.tasks.detection.inputs`): ``model.detect`` (a :class:`~larex.models.detection.base.DetectorAdapter`)
returns the detections of the batch while a hook records the hooked map [B, C, h, w]. Then, vectorized over boxes:

* ``boxes`` = input-frame boxes mapped to the original image (gain + pad of each image's letterbox);
* the input-frame boxes are mapped onto the hooked map by ``map_size / input_size`` per axis (the map covers the
  padded input; ``fmap_w / img_w`` would be wrong under padding) and RoIAligned (``roi_output_size``,
  ``sampling_ratio``, ``aligned``) -> ``roi_features`` = channel means [M, C];
* ``roi_latent`` [M, S, C]: the RoI features under S DropBlock masks of the RoI grid (the hooked layer's MC layer
  parameters, or ``hooked_layer.drop_prob`` / ``block_size``; masks drawn from the mask seed as the shared image
  masks are, :func:`larex.extraction.mc.deterministic_masks`), channel means. The same masks for every box, so a
  box's samples depend only on its features and the seed;
* ``box_penultimate`` [M, F]: the detector's own per-box features, the input of its linear class head (the adapter's
  ``Detections.features``); :class:`BoxHead` stores that head (``box_head.weight`` / ``box_head.bias``) once;
* ``no_object`` [B]: 1 for an image without any kept box (its rows are absent, never dropped silently: the task
  reports the count and share, and its image-level policy scores it);
* ``whole_roi_features`` / ``whole_roi_latent`` (image rows, when the ``whole_image`` no-object policy asks): the
  same features of one box per image covering its content (the letterbox padding excluded).
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from larex.extraction.hooks import capture_output, resolve_module
from larex.extraction.mc import deterministic_masks, eval_mode, mc_modules
from larex.extraction.producers.base import Producer, first_tensor

BASE_KEYS = ("image_index", "boxes", "box_scores", "box_labels", "no_object")


class Boxes(Producer):
    """Args: hooked_layer (dotted path of the map RoIAligned), keys (``BASE_KEYS`` always; plus ``box_logits``,
    ``box_penultimate``, ``roi_features``, ``roi_latent``), predict_conf / nms_iou / max_det (box selection), roi_output_size,
    sampling_ratio, aligned (RoIAlign), roi_std (``roi_features`` = channel means and standard deviations over
    the RoI grid, [M, 2C], as the seeds' box extractor offers), mc_samples (S), seed (mask seed), drop_prob /
    block_size (RoI DropBlock; None = the MC layer's), mask_norm (``expected`` | ``per_mask``, as for the image
    masks)."""

    name = "boxes"
    provides = (*BASE_KEYS, "box_logits", "box_penultimate", "roi_features", "roi_latent", "whole_roi_features",
                "whole_roi_latent")

    def __init__(self, hooked_layer: str, keys=BASE_KEYS, predict_conf: float = 0.25, nms_iou: float = 0.7,
                 max_det: int = 100, roi_output_size: int = 7, sampling_ratio: int = 2, aligned: bool = True,
                 mc_samples: int = 16, seed: int = 0, drop_prob: float | None = None, block_size: int | None = None,
                 mask_norm: str = "expected", roi_std: bool = False):
        unknown = [k for k in keys if k not in self.provides]
        if unknown:
            raise ValueError(f"Boxes produces {self.provides}; got {unknown}")
        super().__init__(tuple(k for k in self.provides if k in (*BASE_KEYS, *keys)))
        if not 0.0 <= float(predict_conf) < 1.0:
            raise ValueError(f"task.boxes.predict_conf must be in [0, 1); got {predict_conf!r}")
        if int(max_det) < 1 or int(roi_output_size) < 1 or int(mc_samples) < 1:
            raise ValueError("task.boxes.max_det, roi_output_size and hooked_layer.mc_samples must be >= 1")
        self.hooked_layer, self.predict_conf, self.nms_iou = str(hooked_layer), float(predict_conf), float(nms_iou)
        self.max_det, self.roi_output_size = int(max_det), int(roi_output_size)
        self.sampling_ratio, self.aligned = int(sampling_ratio), bool(aligned)
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        self.drop_prob, self.block_size, self.mask_norm = drop_prob, block_size, str(mask_norm)
        self.roi_std = bool(roi_std)
        self._masks: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_plan(cls, keys, requests, context):
        hl = dict(context["hooked_layer"])
        boxes = dict((context.get("task") or {}).get("boxes") or {})
        seed = hl.get("mask_seed") if hl.get("mask_seed") is not None else context.get("seed", 0)
        return cls(str(hl["path"]), keys=keys, mc_samples=int(hl["mc_samples"]), seed=int(seed),
                   drop_prob=hl.get("drop_prob"), block_size=hl.get("block_size"),
                   mask_norm=str(hl.get("mask_norm", "expected")),
                   **{k: boxes[k] for k in ("predict_conf", "nms_iou", "max_det", "roi_output_size",
                                            "sampling_ratio", "aligned", "roi_std") if k in boxes})

    def identity(self):
        ident = {"keys": sorted(self.keys), "hooked_layer": self.hooked_layer, "predict_conf": self.predict_conf,
                 "nms_iou": self.nms_iou, "max_det": self.max_det}
        if {"roi_features", "roi_latent", "whole_roi_features", "whole_roi_latent"} & set(self.keys):
            ident.update(roi_output_size=self.roi_output_size, sampling_ratio=self.sampling_ratio,
                         aligned=self.aligned)
            if self.roi_std and {"roi_features", "whole_roi_features"} & set(self.keys):  # others keep their hashes
                ident["roi_std"] = True
        if {"roi_latent", "whole_roi_latent"} & set(self.keys):
            ident.update(mc_samples=self.mc_samples, seed=self.seed, drop_prob=self.drop_prob,
                         block_size=self.block_size, mask_norm=self.mask_norm)
        return ident

    def _mc_layer(self, model):
        inside = mc_modules(resolve_module(model, self.hooked_layer))
        found = inside or mc_modules(model)
        if not found:
            raise ValueError(f"roi_latent needs DropBlock parameters: {type(model).__name__} has no dropout/DropBlock "
                             "layer; set hooked_layer.insert (kind, drop_prob, block_size) to insert one at the "
                             "hooked layer")
        return found[0][1]

    def setup(self, model):
        resolve_module(model, self.hooked_layer)
        if not callable(getattr(model, "detect", None)):
            raise TypeError(f"box features need a detector adapter with detect(x, conf, iou, max_det) "
                            f"(larex.models.detection); got {type(model).__name__}")
        if {"roi_latent", "whole_roi_latent"} & set(self.keys):
            self._mc_layer(model)
        if "box_penultimate" in self.keys:
            model.box_head()  # a family without a linear class head per box says so here, before any compute

    def roi_masks(self, model, channels: int, device) -> torch.Tensor:
        """The S RoI masks [S, r, r] (float32 on ``device``)."""
        r = self.roi_output_size
        key = (channels, str(device))
        if key not in self._masks:
            mul, _ = deterministic_masks(self._mc_layer(model), (channels, r, r), self.mc_samples, self.seed, 0,
                                         drop_prob=self.drop_prob, block_size=self.block_size, norm=self.mask_norm)
            self._masks[key] = mul.reshape(self.mc_samples, -1, r, r)[:, 0].to(device=device, dtype=torch.float32)
        return self._masks[key]

    def _box_features(self, model, fmap, image, on_map, want_latent: bool):
        """``(roi_features [K, C or 2C], roi_latent [K, S, C] or None)`` of boxes on the map."""
        masks = self.roi_masks(model, fmap.shape[1], fmap.device) if want_latent else None
        feats, latent = roi_means(fmap, image, on_map, self.roi_output_size, self.sampling_ratio, self.aligned, masks)
        if self.roi_std:  # the grid itself is needed for its spread
            rois = torch.cat([image.to(fmap.dtype)[:, None], on_map.to(fmap)], dim=1)
            grid = roi_align(fmap, rois, output_size=(self.roi_output_size,) * 2, spatial_scale=1.0,
                             sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            feats = torch.cat([feats, grid.flatten(2).std(2, unbiased=False)], dim=1)
        return feats, latent

    def produce(self, model, x, y, index):
        from larex.tasks.detection.inputs import boxes_to_original

        layer = resolve_module(model, self.hooked_layer)
        with torch.inference_mode(), eval_mode(model), capture_output(layer) as cap:
            det = model.detect(x, conf=self.predict_conf, iou=self.nms_iou, max_det=self.max_det)
        if cap.calls != 1:
            raise RuntimeError(f"hooked layer {self.hooked_layer!r} ran {cap.calls} times in one forward of "
                               f"{type(model).__name__}; choose a layer that runs exactly once")
        b = x.shape[0]
        img = det.image_index.to(torch.int64)
        transforms = torch.stack([torch.as_tensor(t["transform"]) for t in y]).to(img.device)
        out = {"image_index": index.to(img.device)[img].cpu(),
               "boxes": boxes_to_original(det.boxes, transforms[img]).float().cpu(),
               "box_scores": det.scores.float().cpu(), "box_labels": det.labels.to(torch.int64).cpu(),
               "no_object": (torch.bincount(img, minlength=b) == 0).to(torch.uint8).cpu()}
        if "box_logits" in self.keys:
            out["box_logits"] = det.logits.float().cpu()
        if "box_penultimate" in self.keys:
            if det.features is None:
                raise ValueError(f"{type(model).__name__}.detect returned no per-box features (Detections.features) "
                                 "although it has a box_head(); box_penultimate needs both")
            out["box_penultimate"] = det.features.float().cpu()
        if {"roi_features", "roi_latent", "whole_roi_features", "whole_roi_latent"} & set(self.keys):
            fmap = first_tensor(cap.value, f"hooked layer {self.hooked_layer!r}").float()
            if fmap.dim() != 4:
                raise ValueError(f"box features RoIAlign a map [B, C, h, w]; hooked layer {self.hooked_layer!r} "
                                 f"gives {tuple(fmap.shape)}")
            from larex.tasks.detection.geometry import to_feature_map

            if {"roi_features", "roi_latent"} & set(self.keys):
                on_map = to_feature_map(det.boxes.float(), tuple(x.shape[-2:]), tuple(fmap.shape[-2:]))
                feats, latent = self._box_features(model, fmap, img.to(fmap.device), on_map.to(fmap.device),
                                                   "roi_latent" in self.keys)
                if "roi_features" in self.keys:
                    out["roi_features"] = feats.cpu()
                if latent is not None:
                    out["roi_latent"] = latent.cpu()
            if {"whole_roi_features", "whole_roi_latent"} & set(self.keys):  # one box per image: its content
                t = transforms.to(torch.float64)
                content = torch.stack([t[:, 2], t[:, 3], t[:, 2] + t[:, 5] * t[:, 0], t[:, 3] + t[:, 4] * t[:, 1]], 1)
                whole = to_feature_map(content.float().to(fmap.device), tuple(x.shape[-2:]), tuple(fmap.shape[-2:]))
                wf, wl = self._box_features(model, fmap, torch.arange(b, device=fmap.device), whole,
                                            "whole_roi_latent" in self.keys)
                if "whole_roi_features" in self.keys:
                    out["whole_roi_features"] = wf.cpu()
                if wl is not None:
                    out["whole_roi_latent"] = wl.cpu()
        return out


class BoxHead(Producer):
    """``box_head.weight`` [C, F] / ``box_head.bias`` [C]: the detector adapter's linear class head over
    ``box_penultimate`` (:meth:`~larex.models.detection.base.DetectorAdapter.box_head`), stored once per model."""

    name = "box_head"
    provides = ("box_head.weight", "box_head.bias")

    def __init__(self, keys=provides):
        super().__init__(self.provides)

    def setup(self, model):
        if not callable(getattr(model, "box_head", None)):
            raise TypeError(f"box_head.* needs a detector adapter with box_head() (larex.models.detection); got "
                            f"{type(model).__name__}")
        model.box_head()

    def model_arrays(self, model):
        weight, bias = model.box_head()
        return {"box_head.weight": weight.detach().float().cpu().clone(),
                "box_head.bias": bias.detach().float().cpu().clone()}


def _axis_weights(lo: torch.Tensor, hi: torch.Tensor, r: int, ratio: int, size: int, aligned: bool) -> torch.Tensor:
    """torchvision RoIAlign's bilinear weights along one axis, averaged over each bin's ``ratio`` samples:
    ``[K, r, size]`` (bin p of box k, map cell i). A sample outside [-1, size] weighs nothing; one beyond the last
    cell takes the last cell -- torchvision's rules, axis by axis."""
    start = lo - 0.5 if aligned else lo
    length = hi - lo if aligned else (hi - lo).clamp(min=1.0)
    step = (torch.arange(r, dtype=lo.dtype, device=lo.device)[:, None]
            + (torch.arange(ratio, dtype=lo.dtype, device=lo.device)[None, :] + 0.5) / ratio)  # [r, ratio]
    y = start[:, None, None] + step[None] * (length / r)[:, None, None]  # [K, r, ratio]
    inside = ((y >= -1.0) & (y <= size)).to(lo.dtype)
    y = y.clamp(min=0.0)
    low = y.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    frac = torch.where(edge, torch.zeros_like(y), y - low.to(y.dtype))
    high = torch.where(edge, low, low + 1)
    w = (torch.nn.functional.one_hot(low, size).to(lo.dtype) * (1 - frac)[..., None]
         + torch.nn.functional.one_hot(high, size).to(lo.dtype) * frac[..., None])
    return (w * inside[..., None]).mean(2)


def roi_means(fmap: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, r: int, sampling_ratio: int,
              aligned: bool, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Channel means of the RoIAlign grids (``[K, C]``) and, with ``masks`` [S, r, r], of the masked grids
    (``[K, S, C]``: ``mean_hw(roi * mask_s)``), for boxes [K, 4] in map pixels on images ``image`` [K].

    RoIAlign is linear in the map and its bilinear sampling on a regular grid is separable (the weight of cell
    (i, j) in bin (p, q) is ``Y[p, i] * X[q, j]``), so every grid mean is a weighted sum of the map's cells with
    weights ``Y^T m_s X``. Where that is cheaper (a coarse map: few cells; a fixed ``sampling_ratio``), the weights
    are built per axis and applied with one batched product; else RoIAlign runs on the map itself. Both give
    torchvision's numbers (up to float rounding)."""
    b, c, h, w = fmap.shape
    k = boxes.shape[0]
    s = 0 if masks is None else masks.shape[0]
    if k == 0:
        return fmap.new_zeros(0, c), (None if masks is None else fmap.new_zeros(0, s, c))
    if sampling_ratio <= 0 or h * w * (s + 1) > r * r * (sampling_ratio ** 2 + s):  # align the channels themselves
        rois = torch.cat([image.to(fmap.dtype)[:, None], boxes.to(fmap.dtype)], dim=1)
        roi = roi_align(fmap, rois, output_size=(r, r), spatial_scale=1.0, sampling_ratio=sampling_ratio,
                        aligned=aligned)  # [K, C, r, r]
        latent = None if masks is None else torch.einsum("kchw,shw->ksc", roi, masks) / (r * r)
        return roi.mean((2, 3)), latent
    bx = boxes.to(fmap.dtype)
    ys = _axis_weights(bx[:, 1], bx[:, 3], r, sampling_ratio, h, aligned)  # [K, r, h]
    xs = _axis_weights(bx[:, 0], bx[:, 2], r, sampling_ratio, w, aligned)  # [K, r, w]
    weights = (ys.mean(1)[:, :, None] * xs.mean(1)[:, None, :]).reshape(k, 1, h * w)
    if masks is not None:
        per_sample = torch.einsum("kpi,spq,kqj->ksij", ys, masks.to(fmap.dtype), xs).reshape(k, s, h * w) / (r * r)
        weights = torch.cat([weights, per_sample], dim=1)  # [K, 1 + S, hw]
    # per image, its boxes' weight rows (padded to the most boxes of an image) times the image's cells: one batched
    # product over the B maps, no per-box copy of the map
    counts = torch.bincount(image, minlength=b)
    order = torch.argsort(image, stable=True)  # boxes come sorted by image; any order works
    slot = torch.empty_like(image)
    slot[order] = torch.arange(k, device=image.device) - (torch.cumsum(counts, 0) - counts)[image[order]]
    most = int(counts.max())
    padded = weights.new_zeros(b, most, s + 1, h * w)
    padded[image, slot] = weights
    out = torch.bmm(padded.reshape(b, most * (s + 1), h * w), fmap.reshape(b, c, h * w).transpose(1, 2))
    out = out.reshape(b, most, s + 1, c)[image, slot]  # [K, 1 + S, C]
    return out[:, 0], (None if masks is None else out[:, 1:])
