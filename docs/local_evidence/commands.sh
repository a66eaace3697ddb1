#!/bin/bash
# Exact commands of the issue-#14 study (run from the repository root of the research-local worktree).
set -e
export PYTHONPATH=src HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1

# 1. BSData (checkout of https://github.com/2Obe/BSData, commit 7204b28, at /work/data/cache/BSData_repo)
python benchmarks/make_bsdata.py --repo /work/data/cache/BSData_repo --out /work/data/bsdata/bsdata \
    --max-side 560 --train-fraction 0.7 --seed 0 --done /work/data/bsdata/DONE

# 2. Baselines (PatchCore first; jobs already in docs/local_evidence/baselines.jsonl are skipped)
nice -n 10 python benchmarks/local_evidence_baselines.py --out docs/local_evidence --coreset-ratio 0.02 \
    --models patchcore,dfm,padim,gaussft_frozen

# 3. Feature cache (one backbone pass per image)
nice -n 10 python benchmarks/local_evidence_features.py --cache /work/data/cache/local_evidence

# 4. Screen (seed 0; the run was stopped after BSData and ELPV mono; all map variants known then, 8 grids)
nice -n 10 python benchmarks/local_evidence_study.py --datasets bsdata,elpv_mono --seeds 0 --tag study \
    --map-variants m_default,m_k3,m_z,m_q,m_k3_z,m_k3_q,m_l234,m_l2345,m_l35,m_l34,m_l3,m_l2345_z,m_l2345_k3_z,m_l234_k3_z,m_pp,m_pp_k3_z,m_fre,m_fre_k3,m_cat345,m_cat345_k3,m_cat35_k3,m_cat2345_k3,m_s0,m_s2,m_s8,m_k3_z_s2,m_k3_z_s8 \
    --grid-variants g_l8_2,g_l7_2,g_l6_2,g_l7_4,g_l5_4,g_l7_4s,g_l5_4s,g_l8_4s --out docs/local_evidence

# 5. Focused run (3 seeds)
MAPS=m_default,m_k3,m_k3_z,m_l35,m_fre,m_cat345_k3,m_pp,m_pp_k3,m_pp_k3_z,m_pp_l35,m_pp_s2,m_r7,m_r7_k3,m_r7_k3_z,m_r7_l35,m_r7_s2,m_r14,m_r14_k3,m_r14_k3_z,m_r14_l35,m_r14_s2,m_r7_cat35_k3,m_r7_cat35,m_r14_cat35_k3,m_r7_l2345
for s in 0 1 2; do
  nice -n 10 python benchmarks/local_evidence_study.py --datasets bsdata,elpv_mono,elpv_poly,brick,grass,gravel --seeds $s \
    --map-variants $MAPS --grid-variants g_l5_4,g_l6_2,g_l7_2,g_l8_4s --out docs/local_evidence --tag focus
done

# 6. Extra run: joint layout Gaussians, top-k fractions (3 seeds)
MAPS=m_r7,m_r14_l35,m_r7_k3,m_r14_k3,m_pp_k3,m_r7_cat35_k3,m_r14_cat35_k3,m_r7_l3456_k3,m_r7_l35_k3,m_r7_l2345_k3
for s in 0 1 2; do
  nice -n 10 python benchmarks/local_evidence_study.py --datasets elpv_mono,bsdata,elpv_poly,brick,grass,gravel --seeds $s \
    --map-variants $MAPS --grid-variants g_l5_4,g_l5_3j,g_l6_2j,g_l4_3j,g_l5_3f,g_l5_2j \
    --top-fractions top0.1=0.001,top0.5=0.005,top1=0.01,top5=0.05 --out docs/local_evidence --tag extra
done

# 7. Refit run (test images scored by Gaussians refitted on all training images; 3 seeds)
MAPS=m_default,m_r7,m_r14,m_r14_l35,m_r7_k3,m_r14_k3,m_pp_k3,m_r14_cat35_k3,m_r7_cat35_k3
for s in 0 1 2; do
  nice -n 10 python benchmarks/local_evidence_study.py --datasets elpv_mono,bsdata,elpv_poly,brick,grass,gravel --seeds $s \
    --map-variants $MAPS --grid-variants g_l5_4,g_l5_3j,g_l5_3f --top-fractions top1=0.01,top5=0.05 --refit \
    --out docs/local_evidence --tag refit
done

# 8. Recommended design, per-image scores, paired bootstrap against the baselines
nice -n 10 python benchmarks/local_evidence_final.py --seeds 0,1,2 --out docs/local_evidence
nice -n 10 python benchmarks/local_evidence_final.py --seeds 0,1,2 --no-refit --out docs/local_evidence

# 9. Export check, summaries, tables
python benchmarks/local_evidence_export_check.py --set bsdata --out docs/local_evidence/export_check.json
for tag in study focus extra refit; do python benchmarks/local_evidence_report.py --tag $tag > /dev/null; done
python benchmarks/local_evidence_tables.py > docs/local_evidence/tables.md

# 10. Magnetic Tile (github.com/abin24/Magnetic-tile-defect-datasets., commit cc4eb53, files at /work/data/cache/mt_repo)
python benchmarks/make_magnetic_tile.py --repo /work/data/cache/mt_repo --out /work/data/magnetic_tile/magnetic_tile \
    --size 320 --train-fraction 0.7 --seed 0
V='{"gaussft_default": {"map_gaussian": "regional", "image_score": "local", "map_neighbourhood": 1},
    "gaussft_default_frozen": {"map_gaussian": "regional", "image_score": "local", "map_neighbourhood": 1, "fine_tune_epochs": 0}}'
# (run into a scratch folder; the PaDiM, PatchCore and DFM rows were appended to baselines.jsonl, the two GaussFT
#  rows to docs/results/results.jsonl, the default's map before map_neighbourhood existed)
nice -n 10 python benchmarks/local_evidence_baselines.py --out /tmp/runs/mt --results-file mt.jsonl --coreset-ratio 0.02 \
    --models dfm,padim,patchcore,gaussft_default_frozen,gaussft_default --datasets magnetic_tile --variants "$V"
# the pre-#14 GaussFT (the builtin gaussft_frozen is today's default): renamed gaussft_frozen in baselines.jsonl
nice -n 10 python benchmarks/local_evidence_baselines.py --out /tmp/runs/pre14 --results-file pre14.jsonl \
    --models gaussft_pre14 --datasets magnetic_tile \
    --variants '{"gaussft_pre14": {"map_gaussian": "shared", "image_score": "gaussian_ad", "map_neighbourhood": 1, "fine_tune_epochs": 0}}'
nice -n 10 python benchmarks/local_evidence_features.py --cache /work/data/cache/local_evidence --datasets magnetic_tile
nice -n 5 python benchmarks/local_evidence_study.py --datasets magnetic_tile --seeds 0 --tag mt --refit \
    --map-variants m_default,m_r7,m_r14,m_pp,m_r7_fre,m_r7_l3456,m_r7_l34567,m_r7_l3457,m_r7_l3456_z,m_r7_l567,m_r7_l6,m_r7_l7,m_r7_l5,m_r7_s8,m_r7_k3 \
    --grid-variants g_l5_3j,g_l5_3f --out docs/local_evidence
nice -n 5 python benchmarks/local_evidence_study.py --datasets magnetic_tile,bsdata,brick,grass,gravel,elpv_mono,elpv_poly \
    --seeds 0 --tag deep --refit --grid-variants g_l5_3j --out docs/local_evidence \
    --map-variants m_r7,m_r7_k3,m_r7_k5,m_r7_l3456,m_r7_l34567,m_r7_l567,m_r7_l67,m_r7_l3467,m_r7_l34567_k3,m_r7_l567_k3,m_r7_l3456_k3,m_r7_l6

# 11. Fine and coarse maps combined (PYTHONPATH=src:benchmarks)
python benchmarks/multiscale_map_study.py --seeds 0 --out docs/local_evidence/multiscale
python benchmarks/multiscale_map_study.py --seeds 1,2 --coarse k3 --out docs/local_evidence/multiscale
python benchmarks/multiscale_map_study.py --summary docs/local_evidence/multiscale
nice -n 5 python benchmarks/local_evidence_study.py --datasets magnetic_tile,bsdata,brick,grass,gravel --seeds 0 --tag fine \
    --refit --map-variants m_r7_k3,m_r14_k3,m_pp_k3,m_r14 --grid-variants g_l5_3j --out docs/local_evidence

# 12. Region count with the 3 x 3 average (12 x 12 default); comb2_z[g_l5_3j_max+<map>_top1] is the local score
nice -n 5 python benchmarks/local_evidence_study.py --datasets bsdata,magnetic_tile,brick,grass,gravel,elpv_mono,elpv_poly \
    --seeds 0,1,2 --tag regions --refit --map-variants m_r7_k3,m_r10_k3,m_r12_k3,m_r14_k3 --grid-variants g_l5_3j \
    --out docs/local_evidence
nice -n 5 python benchmarks/local_evidence_study.py --datasets bsdata,magnetic_tile,brick,grass,gravel,elpv_mono,elpv_poly \
    --seeds 0 --tag regions2 --refit --map-variants m_r12_k3_s2,m_r12_k3_l2345,m_r12_k3_l35 --grid-variants g_l5_3j \
    --out docs/local_evidence

# 13. Two sets none of the defaults saw: KolektorSDD and DeepPCB (converted from their public GitHub copies)
git -C /work/.mirror/stoy95536+KolektorSDD_Yolov8_Datasets/repo archive 81e5cf3 | tar -x -C /work/data/cache/ksdd_repo
python benchmarks/make_kolektorsdd.py --repo /work/data/cache/ksdd_repo --out /work/data/kolektorsdd/kolektorsdd
git -C /work/.mirror/tangsanli5201+DeepPCB/repo archive 08e98c4 PCBData | tar -x -C /work/data/cache/deeppcb_repo
python benchmarks/make_deeppcb.py --repo /work/data/cache/deeppcb_repo --out /work/data/deeppcb/deeppcb
nice -n 10 python benchmarks/local_evidence_baselines.py --out docs/local_evidence --coreset-ratio 0.02 \
    --models dfm,padim,patchcore --datasets kolektorsdd,deeppcb
nice -n 15 python benchmarks/local_evidence_features.py --datasets kolektorsdd,deeppcb
nice -n 15 python benchmarks/local_evidence_study.py --datasets kolektorsdd,deeppcb --seeds 0,1,2 --tag unseen --refit \
    --map-variants m_r7,m_r7_k3,m_r12_k3,m_r14_k3,m_r12_k3_l2345 --grid-variants g_l5_3j --out docs/local_evidence
python benchmarks/score_terms_table.py --study docs/local_evidence --tags regions,unseen \
    --baselines docs/local_evidence/baselines.jsonl --out docs/local_evidence/score_terms.md
PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12 --coarse r12_k3,r12_k5 --seeds 0 \
    --datasets deeppcb,kolektorsdd,magnetic_tile,bsdata,brick,grass,gravel,elpv_mono,elpv_poly --out docs/local_evidence/multiscale12
PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_l3 --coarse r12_k3 --seeds 0 \
    --datasets deeppcb,kolektorsdd,magnetic_tile,bsdata,brick,grass,gravel,elpv_mono,elpv_poly --out docs/local_evidence/multiscale12_l3
python benchmarks/multiscale_map_study.py --summary docs/local_evidence/multiscale12
python benchmarks/multiscale_map_study.py --summary docs/local_evidence/multiscale12_l3

# 14. The fused heatmap (map_detail_levels): how to fuse, then end to end with the package (frozen and default)
PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_l3 --coarse r12_k3 --seeds 0,1,2 \
    --datasets deeppcb,magnetic_tile,bsdata,kolektorsdd,brick,grass,gravel --out docs/local_evidence/fusion_l3
for fine in l2 l23; do
    PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_$fine --coarse r12_k3 --seeds 0 \
        --datasets deeppcb,magnetic_tile,bsdata,kolektorsdd,brick,grass,gravel --out docs/local_evidence/fusion_$fine
done
# the detail map's blur (shipped: half the map's sigma, 2 px)
PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_l3 --coarse r12_k3 --fine-sigma 2 \
    --seeds 0,1,2 --datasets deeppcb,magnetic_tile,bsdata,kolektorsdd,brick,grass,gravel --out docs/local_evidence/fusion_l3_sigma2
PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_l3 --coarse r12_k3 --fine-sigma 1 \
    --seeds 0 --datasets deeppcb,magnetic_tile,kolektorsdd,bsdata,brick,grass,gravel --out docs/local_evidence/fusion_l3_sigma1
PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_l3 --coarse r12_k3 --fine-sigma 8 \
    --seeds 0 --datasets deeppcb,magnetic_tile,kolektorsdd,bsdata --out docs/local_evidence/fusion_l3_sigma8
# the detail map above its own tail only (qexc rows; run after the fused map shipped)
PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_l3 --coarse r12_k3 --fine-sigma 2 \
    --seeds 0 --datasets deeppcb,magnetic_tile,kolektorsdd,bsdata,brick,grass,gravel --out docs/local_evidence/fusion_l3_sigma2_exc
for d in fusion_l3 fusion_l2 fusion_l23 fusion_l3_sigma1 fusion_l3_sigma2 fusion_l3_sigma8 fusion_l3_sigma2_exc; do
    python benchmarks/multiscale_map_study.py --summary docs/local_evidence/$d
done
# end to end: docs/results/r13s4 is the same two runs before the detail map's blur was halved
python benchmarks/local_evidence_baselines.py --out docs/results/r13 --results-file r13_frozen.jsonl \
    --models gaussft_default_frozen --datasets deeppcb,magnetic_tile,bsdata,kolektorsdd,brick,grass,gravel,elpv_mono,elpv_poly \
    --variants '{"gaussft_default_frozen": {"fine_tune_epochs": 0}}'
python benchmarks/local_evidence_baselines.py --out docs/results/r13 --results-file r13_ft.jsonl --models gaussft_default \
    --datasets deeppcb,magnetic_tile,bsdata,kolektorsdd,brick,grass,gravel --variants '{"gaussft_default": {}}'
