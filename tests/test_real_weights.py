"""Quality checks with real ImageNet weights (tf_efficientnet_lite0 from ../shared/hf-cache; skipped without it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from sklearn.metrics import roc_auc_score

from anomalib_gaussft import GaussFT

pytestmark = [pytest.mark.slow, pytest.mark.real_weights]


def _fit_frozen(model: GaussFT, datamodule: MVTecAD) -> None:
    model.model.eval()
    for batch in datamodule.train_dataloader():
        model.model.update_statistics(model.pre_processor.transform(batch.image))
    model.model.fit()


@pytest.mark.parametrize("category", ["brick", "gravel"])
def test_synthetic_defects_on_real_textures_score_higher(
    real_weights: dict[str, str], texture_root_large: Path, category: str
) -> None:
    datamodule = MVTecAD(
        root=texture_root_large, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0
    )
    datamodule.setup()
    model = GaussFT(**real_weights, pre_trained=True, image_size=160)
    _fit_frozen(model, datamodule)
    scores, labels, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            out = model.model(model.pre_processor.transform(batch.image))
            scores.append(out.pred_score)
            labels.append(batch.gt_label)
            maps.append(out.anomaly_map)
            masks.append(batch.gt_mask)
    image_auroc = roc_auc_score(torch.cat(labels).int().numpy(), torch.cat(scores).numpy())
    pixel_auroc = roc_auc_score(torch.cat(masks).flatten().int().numpy(), torch.cat(maps).flatten().numpy())
    maps, masks = torch.cat(maps)[:, 0], torch.cat(masks).bool()
    defective = masks.flatten(1).any(1)
    peak = maps[defective].flatten(1).argmax(1)
    # The peak counts as inside when it is within 4 px of the defect (the map is blurred with sigma 4).
    near_defect = torch.nn.functional.max_pool2d(masks[defective][:, None].float(), 9, 1, 4)[:, 0].bool()
    peak_inside = near_defect.flatten(1).gather(1, peak[:, None]).float().mean().item()
    print(f"{category}: image AUROC {image_auroc:.3f}, pixel AUROC {pixel_auroc:.3f}, peak inside {peak_inside:.2f}")
    assert image_auroc > 0.9
    assert pixel_auroc > 0.9
    assert peak_inside >= 0.8
