"""Anchor matching and numpy training of the new class rows (logistic regression per anchor row).

Matching (per image, per new class k), on the boxes the frozen box predictor actually outputs:

- positive: the decoded box of the anchor overlaps a box of class k with IoU >= ``positive_iou``,
  or it is the best decoded box of such a ground-truth box (IoU >= ``min_best_iou``);
- negative: both the anchor and its decoded box overlap every box of class k by less than
  ``negative_iou`` (boxes of the other new classes are negatives for k); every anchor of a
  negative image (``--negatives``) is negative;
- the rest is ignored.

Training: for each class predictor, one linear model over the predictor's input (the
``kh x kw x D`` patch at each location) with one output per (anchor, new class), sigmoid +
binary cross entropy, positives and negatives balanced per output, L2, Adam, weights kept in
the range the predictor's existing quantization scale can store. Round 1 uses every location
with a positive plus random negative locations; later rounds add the hard negatives (the
highest-scoring negative anchors over all images), as SSD training does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from edgeadapt.detection.features import FeatureExtractor, ImageFeatures
from edgeadapt.detection.rewrite import NewRows, logit_limits, weight_limits
from edgeadapt.detection.structure import ClassPredictor, SSDStructure

logger = logging.getLogger(__name__)
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


@dataclass(frozen=True)
class TrainingOptions:
    """Matching thresholds and optimiser settings for the new rows."""

    positive_iou: float = 0.7
    negative_iou: float = 0.5
    min_best_iou: float = 0.3
    random_negatives_per_positive: float = 8.0
    hard_negatives_per_positive: float = 4.0
    rounds: int = 2
    steps: int = 100
    learning_rate: float = 0.01
    bias_learning_rate: float = 0.05
    l2: float = 1e-4
    negative_weight: float = 300.0
    seed: int = 0


def corners(anchors: np.ndarray) -> np.ndarray:
    """(N, 4) ycenter, xcenter, h, w -> ymin, xmin, ymax, xmax."""
    half_h, half_w = anchors[:, 2] / 2, anchors[:, 3] / 2
    return np.stack([anchors[:, 0] - half_h, anchors[:, 1] - half_w, anchors[:, 0] + half_h, anchors[:, 1] + half_w], 1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of boxes ymin, xmin, ymax, xmax."""
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match(decoded: np.ndarray, anchor_boxes: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray,
          num_classes: int, options: TrainingOptions) -> np.ndarray:
    """(N, K) int8 labels: 1 positive, 0 negative, -1 ignored (see the module docstring)."""
    labels = np.zeros((decoded.shape[0], num_classes), np.int8)
    if gt_boxes.shape[0] == 0:
        return labels
    decoded_iou = box_iou(decoded, gt_boxes)
    anchor_iou = box_iou(anchor_boxes, gt_boxes)
    for k in range(num_classes):
        mine = np.flatnonzero(gt_classes == k)
        if mine.size == 0:
            continue
        best_decoded = decoded_iou[:, mine].max(axis=1)
        overlap = np.maximum(best_decoded, anchor_iou[:, mine].max(axis=1))
        column = np.where(overlap < options.negative_iou, NEGATIVE, IGNORED).astype(np.int8)
        column[best_decoded >= options.positive_iou] = POSITIVE
        for box in mine:
            best = int(np.argmax(decoded_iou[:, box]))
            if decoded_iou[best, box] >= options.min_best_iou:
                column[best] = POSITIVE
        labels[:, k] = column
    return labels


def patches(values: np.ndarray, predictor: ClassPredictor) -> np.ndarray:
    """(H*W, kh*kw*D) float32 inputs of the predictor convolution at every output location."""
    kh, kw = predictor.kernel
    if (kh, kw) == (1, 1):
        return values.reshape(-1, values.shape[-1])
    height, width = predictor.height, predictor.width
    if predictor.padding == "SAME":
        top, left = (kh - 1) // 2, (kw - 1) // 2
        values = np.pad(values, ((top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    columns = [values[y:y + height, x:x + width, :] for y in range(kh) for x in range(kw)]
    return np.stack(columns, axis=2).reshape(height * width, -1)


class _Adam:
    def __init__(self, shapes: Sequence[tuple[int, ...]], rates: Sequence[float]):
        self.moments = [(np.zeros(s, np.float32), np.zeros(s, np.float32)) for s in shapes]
        self.rates = rates
        self.step = 0

    def update(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.step += 1
        for (m, v), p, g, rate in zip(self.moments, params, grads, self.rates):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            m_hat = m / (1 - 0.9 ** self.step)
            v_hat = v / (1 - 0.999 ** self.step)
            p -= rate * m_hat / (np.sqrt(v_hat) + 1e-8)


def _fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray, bias: np.ndarray, options: TrainingOptions,
         weight_range: tuple[float, float] | None, logit_range: tuple[float, float] | None) -> None:
    """Weighted logistic regression, in place on ``weights`` (F, O) and ``bias`` (O,); y (n, O) in {1, 0, -1}."""
    positive = (y == POSITIVE)
    negative = (y == NEGATIVE)
    pos_count = np.maximum(positive.sum(axis=0), 1)
    neg_count = np.maximum(negative.sum(axis=0), 1)
    # balanced per output: positives sum to 1, negatives to negative_weight
    sample_weight = positive / pos_count + negative * (options.negative_weight / neg_count)
    sample_weight = sample_weight.astype(np.float32)
    target = positive.astype(np.float32)
    optimiser = _Adam([weights.shape, bias.shape], [options.learning_rate, options.bias_learning_rate])
    outputs = max(weights.shape[1], 1)
    for _ in range(options.steps):
        logits = x @ weights + bias
        if logit_range is not None:
            low, high = logit_range
            clipped = np.clip(logits, low, high)
            saturated = ((logits > high) & positive) | ((logits < low) & negative)
        else:
            clipped, saturated = logits, None
        gradient = (1.0 / (1.0 + np.exp(-clipped)) - target) * sample_weight
        if saturated is not None:
            gradient[saturated] = 0.0
        grad_w = x.T @ gradient + options.l2 * outputs * weights
        grad_b = gradient.sum(axis=0)
        optimiser.update([weights, bias], [grad_w.astype(np.float32), grad_b.astype(np.float32)])
        if weight_range is not None:
            np.clip(weights, weight_range[0], weight_range[1], out=weights)


def train_new_rows(structure: SSDStructure, extractor: FeatureExtractor, features: Sequence[ImageFeatures],
                   labels: Sequence[np.ndarray], num_classes: int, options: TrainingOptions = TrainingOptions()) -> list[NewRows]:
    """Learn the new rows of every class predictor.

    Args:
        structure: the detector.
        extractor: gives the feature maps' quantization.
        features: per image, the cached feature maps and decoded boxes.
        labels: per image, (N_anchors, K) int8 from :func:`match`.
        num_classes: K, the number of new classes.
        options: matching/optimiser settings.

    Returns:
        One :class:`~edgeadapt.detection.rewrite.NewRows` per predictor.
    """
    rng = np.random.default_rng(options.seed)
    result = []
    for index, predictor in enumerate(structure.predictors):
        anchors = predictor.anchors_per_location
        locations = predictor.height * predictor.width
        start, stop = predictor.anchor_offset, predictor.anchor_offset + predictor.num_anchors
        per_image = [lab[start:stop].reshape(locations, anchors * num_classes) for lab in labels]

        def rows(image: int, chosen: np.ndarray, index: int = index, predictor: ClassPredictor = predictor) -> np.ndarray:
            values = extractor.dequantize(index, features[image].maps[index])
            return patches(values, predictor)[chosen]

        pos_sets = [np.flatnonzero((lab == POSITIVE).any(axis=1)) for lab in per_image]
        total_pos = int(sum(int((lab == POSITIVE).sum()) for lab in per_image))
        size = predictor.kernel[0] * predictor.kernel[1] * predictor.depth
        weights = np.zeros((size, anchors * num_classes), np.float32)
        bias = np.full(anchors * num_classes, -4.0, np.float32)
        if total_pos == 0:
            logger.debug("predictor %d (%dx%d): no positive anchors; new rows stay at score ~0", index,
                        predictor.height, predictor.width)
            result.append(_as_rows(weights, bias, predictor, num_classes))
            continue
        negative_candidates = [(i, loc) for i, lab in enumerate(per_image)
                               for loc in np.flatnonzero((lab == NEGATIVE).all(axis=1))]
        budget = int(options.random_negatives_per_positive * total_pos) + 64
        pick = rng.choice(len(negative_candidates), size=min(budget, len(negative_candidates)), replace=False)
        chosen = [set(pos.tolist()) for pos in pos_sets]
        for position in pick:
            image, location = negative_candidates[int(position)]
            chosen[image].add(int(location))
        weight_range, logit_range = weight_limits(structure, index), logit_limits(structure, index)
        for round_index in range(options.rounds):
            order = [np.asarray(sorted(c), dtype=np.int64) for c in chosen]
            x = np.concatenate([rows(i, o) for i, o in enumerate(order) if o.size], axis=0)
            y = np.concatenate([per_image[i][o] for i, o in enumerate(order) if o.size], axis=0)
            _fit(x, y, weights, bias, options, weight_range, logit_range)
            if round_index == options.rounds - 1:
                break
            # hard negatives: highest-scoring negative outputs over every location of every image
            scored = []
            for i, lab in enumerate(per_image):
                logits = patches(extractor.dequantize(index, features[i].maps[index]), predictor) @ weights + bias
                logits[lab != NEGATIVE] = -np.inf
                best = logits.max(axis=1)
                scored.append((best, i))
            flat = np.concatenate([s for s, _ in scored])
            owners = np.concatenate([np.full(s.size, i) for s, i in scored])
            locs = np.concatenate([np.arange(s.size) for s, _ in scored])
            count = min(int(options.hard_negatives_per_positive * total_pos), flat.size)
            top = np.argpartition(-flat, count - 1)[:count] if count else np.zeros(0, np.int64)
            for position in top:
                if np.isfinite(flat[position]):
                    chosen[int(owners[position])].add(int(locs[position]))
        logger.debug("predictor %d (%dx%d): %d positive outputs, %d training locations", index, predictor.height,
                    predictor.width, total_pos, sum(len(c) for c in chosen))
        result.append(_as_rows(weights, bias, predictor, num_classes))
    return result


def _as_rows(weights: np.ndarray, bias: np.ndarray, predictor: ClassPredictor, num_classes: int) -> NewRows:
    kh, kw = predictor.kernel
    anchors = predictor.anchors_per_location
    w = weights.reshape(kh, kw, predictor.depth, anchors, num_classes).transpose(3, 4, 0, 1, 2)
    return NewRows(np.ascontiguousarray(w), bias.reshape(anchors, num_classes).copy())
