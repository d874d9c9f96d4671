"""
A glimpse run, or any Hugging Face VLM, on benchmark tasks through lmms-eval: its task definitions, prompts and
scorers; glimpse supplies the model (benchmarks.GlimpseLMM).

    python eval.py --out_dir=out/shapes --tasks=shapes_pope,shapes_mmstar  # offline: eval_tasks/, from data/shapes
    python eval.py --out_dir=out/run --tasks=pope,mmstar,textvqa_val --limit=500   # datasets from the hub
    python eval.py --hf_model=out/shapes_export_hf --tasks=shapes_pope
    python eval.py --out_dir=out/run --tasks=my_task --include_path=my_tasks/   # task YAMLs of your own
    torchrun --standalone --nproc_per_node=8 eval.py --out_dir=out/run --tasks=pope   # questions split over ranks

Writes <out_dir or hf_model>/eval/<task>.json: lmms-eval's metrics, and every sample's question, target, answer
and per-sample scores; prints one line per task. The local tasks of eval_tasks/ (shapes_pope, shapes_mmstar) are
made from data_dir's test split the first time (data_dir/lmms_eval/*.parquet). lmms-eval is an optional extra:
README "Evaluate" says how to install it.
"""
import functools
import json
import os
import sys

import torch

from benchmarks import require_lmms_eval, run_tasks
from checkpoint import load_run
from configurator import apply_config
from runtime import autocast_context, pick_device, pick_dtype

out_dir = 'out/shapes'  # a train_vlm.py run
checkpoint = 'ckpt.pt'  # in out_dir: ckpt.pt, best.pt or weights.pt
hf_model = ''  # instead: a Hugging Face image-text-to-text model directory (SmolVLM, an export.py export, ...)
trust_remote_code = False  # only for a model whose code ships with it and that you trust
tasks = 'shapes_pope,shapes_mmstar'  # lmms-eval task names (or groups), comma-separated
limit = 0  # the first N questions of each task; 0 = all
include_path = ''  # a folder of more task YAMLs (lmms-eval's own and eval_tasks/ are always there)
data_dir = ''  # the dataset the local tasks are made from; '' = the run's own (data/shapes with hf_model)
batch_size = 32
device = 'auto'
dtype = 'auto'
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

require_lmms_eval()  # before any model loads
ddp = int(os.environ.get('RANK', -1)) != -1  # torchrun: lmms-eval splits each task's questions over the ranks
device = pick_device(device)
if ddp:
    if device == 'cuda':
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
amp = functools.partial(autocast_context, device.split(':')[0], pick_dtype(dtype, device.split(':')[0]))

if hf_model:
    from pretrained import HFVLM
    model = HFVLM(hf_model, trust_remote_code).to(device)
    tok = model.processor
    data_dir = data_dir or 'data/shapes'
else:
    model, tok = load_run(out_dir, device, checkpoint, trust_remote_code)
    run = torch.load(os.path.join(out_dir, checkpoint), map_location='cpu', weights_only=True, mmap=True)
    data_dir = data_dir or run['config']['data_dir']
# a benchmark's images are fitted as the run's own were (prepare_data.py's image_size); the tower resizes from there
meta = os.path.join(data_dir, 'meta.json')
image_size = json.load(open(meta)).get('image_size') if os.path.exists(meta) else None

if not ddp or int(os.environ['RANK']) == 0:
    print(f"{hf_model or os.path.join(out_dir, checkpoint)} on {tasks} through lmms-eval ({device}, "
          f"{pick_dtype(dtype, device.split(':')[0])}{f', {limit} questions each' if limit else ''})")
run_tasks(model, tok, tasks, limit, include_path, data_dir, batch_size, image_size, amp,
          results_dir=os.path.join(hf_model or out_dir, 'eval'), progress=True)
if ddp:
    torch.distributed.destroy_process_group()
