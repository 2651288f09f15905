#!/usr/bin/env bash
# Reruns the fault list of issue 16 against the real binaries and prints each
# outcome: a damaged checkpoint (a flipped byte in its data, a removed
# manifest, truncated metadata), resuming past it, a 0-byte LOCK, a
# misspelled macro, a resume with changed settings, a bad value and an
# unwritable eval directory. Every case must end with one `error:` line
# (status 1) or survive cleanly. About 5 minutes on 2 cores.
#
#   scripts/fault_drill.sh [work_dir]
cd "$(dirname "$0")/.."

W="${1:-$(mktemp -d)}"; D="$W/run"; mkdir -p "$W"
rm -rf "$D"
TRAIN="python -m tiered_routing.train --gin_file=gin/quickstart.gin --gin.TRAIN_STEPS=60 --gin.SAVE_EVERY_STEPS=10"
EVAL="python -m tiered_routing.eval --gin_file=gin/quickstart.gin --gin_file=gin/runs/eval.gin"
last() { grep -v '^[WIE][0-9]\{4\}\|^WARNING: All log' "$1" | tail -n 3; }
step() { echo; echo "== $1"; }
step "baseline train 60 steps"
$TRAIN --gin.MODEL_DIR="'$D'" > "$W/base.out" 2>&1; echo "rc=$?"; ls $D/checkpoints
cp -r $D "$W/pristine"
step "1a flip one byte in step 60's largest data file; EVAL"
F=$(find $D/checkpoints/60/state/ocdbt.process_0/d -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
python -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[len(b)//2]^=0xFF; open(p,'wb').write(b)" $F
$EVAL --gin.MODEL_DIR="'$D'" > "$W/1a.out" 2>&1; echo "rc=$?"; last "$W/1a.out"
step "1c flip one byte in every data file of step 60 (params too); EVAL"
rm -rf "$D"; cp -r "$W/pristine" "$D"
for F in $(find $D/checkpoints/60/state/ocdbt.process_0/d -type f); do
  python -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[len(b)//2]^=0xFF; open(p,'wb').write(b)" $F
done
$EVAL --gin.MODEL_DIR="'$D'" > "$W/1c.out" 2>&1; echo "rc=$?"; last "$W/1c.out"
step "1b training restart on the damaged step"
$TRAIN --gin.MODEL_DIR="'$D'" --gin.TRAIN_STEPS=70 > "$W/1b.out" 2>&1; echo "rc=$?"; last "$W/1b.out"
step "2 resume from step 50 with restore_step"
$TRAIN --gin.MODEL_DIR="'$D'" --gin.TRAIN_STEPS=70 --gin.tiered_routing.TrainConfig.restore_step=50 > "$W/2.out" 2>&1; echo "rc=$?"; ls $D/checkpoints; last "$W/2.out"
step "2b damaged manifest of a step; EVAL at that step"
rm -rf $D; cp -r "$W/pristine" $D
rm $D/checkpoints/60/state/manifest.ocdbt
$EVAL --gin.MODEL_DIR="'$D'" > "$W/2b.out" 2>&1; echo "rc=$?"; last "$W/2b.out"
step "2c damaged metadata JSON; TRAIN"
rm -rf $D; cp -r "$W/pristine" $D
printf '{"data_st' > $D/checkpoints/60/metadata/metadata
$TRAIN --gin.MODEL_DIR="'$D'" --gin.TRAIN_STEPS=70 > "$W/2c.out" 2>&1; echo "rc=$?"; last "$W/2c.out"
step "4 a 0-byte LOCK"
rm -rf $D; cp -r "$W/pristine" $D; : > $D/LOCK
$EVAL --gin.MODEL_DIR="'$D'" > /dev/null 2>&1
$TRAIN --gin.MODEL_DIR="'$D'" > "$W/4.out" 2>&1; echo "rc=$?"; last "$W/4.out"; ls $D
step "5 misspelled macro"
$TRAIN --gin.MODEL_DIR="'$D'" --gin.TRAIN_STEP=20 > "$W/5.out" 2>&1; echo "rc=$?"; last "$W/5.out"
step "6 resume with another expert width, seed and batch size"
$TRAIN --gin.MODEL_DIR="'$D'" --gin.tiered_routing.DecoderConfig.expert_d_ff=32 --gin.SEED=3 --gin.BATCH_SIZE=32 > "$W/6.out" 2>&1; echo "rc=$?"; last "$W/6.out"
step "9 bad value"
$TRAIN --gin.MODEL_DIR="'$D'" --gin.TRAIN_STEPS=-1 > "$W/9.out" 2>&1; echo "rc=$?"; last "$W/9.out"
step "9b eval results dir not writable (eval is a file)"
rm -rf $D/eval; echo x > $D/eval
$EVAL --gin.MODEL_DIR="'$D'" > "$W/9b.out" 2>&1; echo "rc=$?"; last "$W/9b.out"
