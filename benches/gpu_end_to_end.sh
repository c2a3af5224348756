#!/usr/bin/env bash
# End-to-end GPU run of RESULTS.md's last section: parity, memory plan, bench train, sampling vs diffusers, PyTorch training step.
#   bash benches/gpu_end_to_end.sh   (on a GPU machine with PyTorch, PEFT and diffusers)
set -u
B=${SDLORA_STAGE:-.gpu}   # folder holding the staged sdlora binary (scripts/gpu-test.sh build)
# diffusers from carried wheels when there is no network (else it must be installed).
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 benches/make_sd15_random.py /tmp/sd 2>&1 | tail -1
echo "### train 200 steps + parity"
$B/sdlora train --model /tmp/sd --data data/cheburashka --out /tmp/p --steps 200 --save-every 100 --log-every 50 --dump-draws /tmp/p/draws.safetensors 2>&1 | grep -v "^encoding\|^training" | tail -6
PYTHONUNBUFFERED=1 python3 benches/train_reference.py /tmp/sd /tmp/p --dtype bf16 2>&1 | grep -v Warn | tail -3
echo "### 1024 px under 4G"
$B/sdlora train --model /tmp/sd --data data/cheburashka --out /tmp/big --resolution 1024 --vram-limit 4G --steps 6 --save-every 6 --log-every 3 2>&1 | grep -E "plan|step 6|done"
echo "### bench train"; $B/sdlora bench train --steps 20 > /tmp/bt.txt 2>&1; head -5 /tmp/bt.txt; sed -n 6,26p /tmp/bt.txt; grep -E "cast_f32_to_bf16|add_bf16" /tmp/bt.txt
echo "### bench train, per-layer AdamW"; $B/sdlora bench train --steps 20 --adamw-per-layer 2>&1 | sed -n 2,4p
echo "### sample parity, merged and on the fly"
python3 -c "import torch; from safetensors.torch import save_file; save_file({'latents': torch.randn(1,4,64,64, generator=torch.Generator().manual_seed(0))}, '/tmp/lat.safetensors')"
P="<cheburashka>, full body, waving hand, friendly smile"
$B/sdlora sample --model /tmp/sd --lora /tmp/p/step_200 --prompt "$P" --init-latents /tmp/lat.safetensors --save-latents /tmp/merged.safetensors --steps 30 --guidance 5 --out /tmp/o.png 2>&1 | tail -1
$B/sdlora sample --model /tmp/sd --lora /tmp/p/step_200 --lora-on-the-fly --prompt "$P" --init-latents /tmp/lat.safetensors --save-latents /tmp/fly.safetensors --steps 30 --guidance 5 --out /tmp/o2.png 2>&1 | tail -1
echo "### sample timing (4 images, graphs) with nvidia-smi memory"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > /tmp/mem.txt & MP=$!
sleep 0.5
$B/sdlora sample --model /tmp/sd --lora /tmp/p/step_200 --prompt "$P" --steps 30 --num-images 4 --out /tmp/s.png 2>&1 | grep -E "denoised|done"
kill $MP; sort -n /tmp/mem.txt | tail -1 | sed 's/^/peak MiB (nvidia-smi, whole process incl. CUDA context): /'
echo "### sample, no graphs"; SDLORA_CUDA_GRAPHS=0 $B/sdlora sample --model /tmp/sd --lora /tmp/p/step_200 --prompt "$P" --steps 30 --num-images 3 --out /tmp/s2.png 2>&1 | grep -E "denoised|done"
echo "### diffusers"
python3 benches/sample_reference.py /tmp/sd /tmp/p/step_200 /tmp/lat.safetensors /tmp/ref.safetensors 30 2>&1 | grep -E "^diffusers"
python3 -c "
from safetensors.torch import load_file
r=load_file('/tmp/ref.safetensors'); b=r['latents'].float(); c=r['latents_without_lora'].float()
for n in ['merged','fly']:
    a=load_file('/tmp/%s.safetensors' % n)['latents']
    print('final latents ours (%s LoRA) vs diffusers rel L2 %.3e' % (n, ((a-b).norm()/b.norm()).item()))
print('LoRA moves diffusers by %.3e' % ((b-c).norm()/c.norm()).item())"
echo "### torch training step, same run"
timeout 240 python3 benches/train_torch_bench.py /tmp/sd --steps 20 --ours $B/sdlora 2>&1 | grep -v -i "warn" | tail -10
echo "### ncu shows our kernel names"
timeout 150 ncu --launch-count 2 -k regex:attn_fwd_hd40 --section SpeedOfLight $B/sdlora bench train --steps 1 2>&1 | grep -E "attn_fwd_hd40|Duration|Compute \(SM\) Throughput|Memory Throughput" | head -8
