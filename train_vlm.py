"""
Train a VLM: vision tower + connector + causal LLM, on a dataset made by prepare_data.py.

    python train_vlm.py config/shapes.py
    python train_vlm.py config/shapes.py --batch_size=16 --max_iters=200 --compile=False
    torchrun --standalone --nproc_per_node=2 train_vlm.py config/shapes.py

Defaults below; a config file and --key=value overrides replace them (see configurator.py).
"""
import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from benchmarks import require_lmms_eval, run_tasks
from checkpoint import (ModelSpec, build_model, load_checkpoint, load_trained_state_dict, raw_state_dict,
                        save_checkpoint, trained_state_dict)
from configurator import apply_config
from data import DataOrder, VLMDataset, step_batches
from lora import DEFAULT_TARGETS
from metrics import caption_scores, qa_accuracy, val_loss
from optim import lr_at, make_optimizer, optimizer_step, set_lr
from perf import Throughput, batch_counts, lora_param_counts
from runtime import (MetricsLogger, checkpoint_due, finish_distributed, precision, rng_states_of_all_ranks,
                     set_rng_state, setup_training)
from sharding import (full_weights, load_full_weights, load_sharded, remove_stale_shards, reshard, save_sharded,
                      shard_model, unshard)
from word_align import word_align

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/shapes'
data_dir = 'data/shapes'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), or an earlier run's out_dir: its model and
                       # tokenizer, a fresh optimizer and schedule (align -> finetune)
max_samples = 0  # train on the first N samples only (0 = all), for quick runs
# model
hf_vlm = ''  # instead of the parts below, a whole Hugging Face image-text-to-text model (SmolVLM / Idefics3,
             # Qwen2-VL): a local directory or a model id in the Hugging Face cache. Its processor and chat
             # template build the inputs; vision_mode/llm_mode apply to its vision tower and language model,
             # the rest stays frozen. Checkpoints hold what trained and name this base.
trust_remote_code = False  # hf_vlm: run model code that ships with the checkpoint (only for a model you trust)
vision = 'scratch'  # 'scratch' (a ViT from the vit_* keys); the out_dir of a train_siglip.py or train_vlm.py run
                    # (its ViT, e.g. stage 1's or the shapes recipe's); or a SigLIP, CLIP or DINOv2 checkpoint
                    # (also the vision half of a CLIPModel/SiglipModel), a local directory or a model id in the
                    # Hugging Face cache: its preprocessor_config.json sets image size, resizing and mean/std.
vision_layer = -1  # pretrained or earlier run's tower: which block's output feeds the connector (-1 last, -2 penultimate as in LLaVA)
vision_cls = False  # pretrained tower: keep the class token among the features (CLIP, DINOv2; needs connector='mlp')
image_size = 64
patch_size = 8
patch_overlap = 0  # each patch embedding also sees this many pixels of its neighbours
vit_layers = 4
vit_width = 128
vit_heads = 4
vit_act = 'gelu'  # the scratch ViT's MLP activation: 'gelu' (exact) or 'gelu_tanh' (SigLIP's, and llama.cpp's: --gguf)
image_resample = 'bicubic'  # how images are resized: 'bicubic', 'bilinear'; or with image_splitting 'lanczos' (llama.cpp's)
connector = 'pixel_shuffle'  # 'mlp', 'pixel_shuffle' (then the MLP), 'pixel_shuffle_linear' (SmolVLM's), or 'bridge' (cross-attention)
pixel_shuffle_factor = 2
bridge_heads = 8  # connector='bridge': cross-attention heads
connector_norm = False  # end the MLP connector with an RMSNorm at the LLM's token-embedding scale (model.MLPProjector)
llm = 'scratch'  # 'scratch' (llm_* keys, built-in tokenizer), or a pretrained LLM with its tokenizer and chat
                 # template: a Hugging Face model directory, a model id in the Hugging Face cache, or a .gguf file;
                 # or the out_dir of a train_vlm.py run (its language model, as trained, and its tokenizer)
llm_layers = 4
llm_width = 256
llm_heads = 4
llm_kv_heads = 2
llm_mlp_width = 688
tie_embeddings = True
tokenizer = 'word'  # 'word' (vocabulary from the training texts) or 'byte'
system_prompt = None  # a pretrained LLM's chat: None as its template does, or this system turn ('' an empty one)
image_layout = 'plain'  # an image's tokens: 'plain' (<image> x N) or 'idefics3' (between SmolVLM's markers: export.py)
image_token_labels = ()  # words before each image token, one per token ('top left', ...: 'top left: <img>, ...')
image_splitting = False  # each image as tiles of image_size plus a global view, SmolVLM's way (tiling.py; idefics3 layout)
max_image_size = 0  # image_splitting: each image's longest edge is first resized to this (e.g. 4 x image_size)
max_seq_len = 256
isolate_turns = False  # each question-answer pair sees the image but not the other pairs (see data.pack_turns)
pack_samples = False  # fill each row with whole samples up to max_seq_len, none seeing another (see data.collate)
num_workers = 0  # DataLoader processes building batches ahead of the step (decoding --shards images); 0 = inline
# what trains: 'full', 'frozen', 'lora' or 'qlora' (LoRA over a 4-bit base) per component; the connector
# always trains. A frozen vision tower runs without autograd; a frozen LLM still carries gradients back to the
# connector but keeps no weight gradients or optimizer state. Unless both are 'full', checkpoints hold only
# what was trained (see checkpoint.py).
vision_mode = 'full'
llm_mode = 'full'
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = DEFAULT_TARGETS  # regexes matched against module names (attention and MLP projections)
rslora = False  # scale alpha / sqrt(r) instead of alpha / r
qlora_quant_type = 'nf4'  # 'nf4' or 'fp4'
qlora_double_quant = True  # quantise the 4-bit blocks' scales too (~0.4 bits/param saved)
grad_checkpointing = False  # recompute decoder blocks in backward: less activation memory, ~30% more compute
attention = 'sdpa'  # masked attention (isolated turns, packed samples): 'sdpa' mask or 'flex' (FlexAttention, compiled)
# optimisation
batch_size = 32  # per process, per micro-step
grad_accum = 1  # micro-steps per optimizer step
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
vision_lr = 0.0  # per-component peak learning rates; 0 = learning_rate (all follow the same schedule)
connector_lr = 0.0
llm_lr = 0.0
optimizer = 'adamw'  # 'adamw'; 'muon' (Muon for hidden weight matrices, AdamW for the rest); or on CUDA
                     # bitsandbytes' 'adamw8bit' or 'paged_adamw'
warmup_iters = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
word_align_iters = 0  # before step 1, train the connector alone to put each image token at the LLM's embedding of
                      # its grid cell's words ('red circle', 'nothing'; word_align.py; needs shapes' 'objects')
word_align_lr = 2e-3
word_align_batch = 64
# evaluation and logging
eval_interval = 250
eval_questions = 500  # held-out val questions answered by generation at each eval
val_batches = 8
test_at_end = True  # answer the test-split questions when training ends
test_questions = 0  # how many of them (0 = all)
eval_captions = 0  # val images captioned at each eval and scored with BLEU-4 and CIDEr-D (caption datasets)
eval_tasks = ''  # lmms-eval tasks also run at each eval ('shapes_pope,shapes_mmstar', 'pope'; benchmarks.py, eval.py)
eval_limit = 0  # questions of each eval task (0 = all)
early_stop_patience = 0  # stop after this many evals without a lower val loss (0 = never stop early)
checkpoint_minutes = 30.0  # also write ckpt.pt once this much training has passed since the last one (0 = at evals only)
log_interval = 10
progress = True  # on a terminal, a progress bar: iteration, loss, images/s, time left
plot_curves = True  # out_dir/training_curves.png at each eval (needs matplotlib; without it, nothing)
peak_flops = 0.0  # device peak FLOP/s for MFU; 0 = measure a large matmul at start and at each eval (the best)
wandb_log = False
wandb_project = 'glimpse'
wandb_run_name = 'shapes'
tensorboard_log = False  # scalars to out_dir/tensorboard (needs the tensorboard package)
# system
device = 'auto'  # 'auto' picks cuda, then mps, then cpu
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16'
compile = False
seed = 1337
ddp_timeout_minutes = 120.0  # torchrun: how long a rank waits for the others in a collective (rank 0 alone
                             # evaluates, checkpoints and tests) before the process group gives up
fsdp = False  # torchrun: shard weights, gradients and optimizer state over the processes (FSDP2, sharding.py)
              # instead of DDP's whole copy on each; `python bench.py CONFIG --plan` says when a recipe needs it
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

# processes, device and precision; then every refusal of the config, before any data or weights load
ddp, rank, local_rank, world_size, device, dtype = setup_training(device, dtype, seed, config, out_dir,
                                                                  ddp_timeout_minutes)
master, device_type = rank == 0, device.split(':')[0]
spec = ModelSpec.from_config(config)  # the keys that decide the model (dtype now resolved)
spec.check(device_type, config)
if eval_tasks:
    require_lmms_eval()  # a one-line error naming the install command, before anything loads
amp, scaler = precision(device_type, dtype)  # autocast (none in fp32), and loss scaling in fp16

# data
train_set = VLMDataset(data_dir, 'train', max_samples)
val_set = VLMDataset(data_dir, 'val')
# a resumed run's checkpoint, on the CPU: its tensors are copied into place (weights, optimizer state)
ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt')) if init_from == 'resume' else None

# model and tokenizer: this run's checkpoint, an earlier run's, or new around the pretrained parts named; the
# modes (frozen, full, LoRA, QLoRA) and, for partial checkpoints, a base to rebuild (checkpoint.build_model).
# With hf_vlm the processor is the tokenizer, and model_cfg only summarises sizes (for MFU).
model, tok, model_cfg, base = build_model(spec, device, train_set.texts(), ckpt, f'{out_dir}/ckpt.pt',
                                          trust_remote_code)
raw_model = model
n_img = model.num_image_tokens
if master:
    print(f'parameters: {model.param_counts()}; {"processor-set" if hf_vlm else n_img} image tokens; '
          f'vocab {tok.vocab_size}; '
          f'train {len(train_set)}, val {len(val_set)}; device {device}, dtype {dtype}, world {world_size}')

# what a checkpoint carries besides the weights: where training stands, the data order, the RNGs
iter_num, best_val, evals_since_best = 0, float('inf'), 0  # evals_since_best: for early stopping
train_time = 0.0  # seconds in training steps, not evaluation
data_state = {'epoch': 0, 'cursor': 0}  # the data order after the last step (data.DataOrder.state)
resume_rng = None  # every rank's generators when the checkpoint was written, restored once start-up is done

# a fresh run's word pre-alignment of the connector (resumed and continued runs have theirs), on each process's
# whole model; then, with fsdp, the model sharded in place, before the optimizer takes its (sharded) parameters
if word_align_iters and not ckpt:
    train_time += word_align(raw_model, tok, train_set, word_align_iters, word_align_batch, word_align_lr, device,
                             amp, seed, print if master else lambda *a: None)
if fsdp:
    n_blocks = shard_model(raw_model, device_type, dtype)
    if master:
        print(f'fsdp: {n_blocks} blocks and the root sharded over {world_size} process' + 'es' * (world_size > 1) +
              (' (bf16 weights in compute, fp32 gradient reduction)' if dtype == 'bfloat16' else ''))
lr_scales = {part: lr / learning_rate for part, lr in
             (('vision_tower', vision_lr), ('connector', connector_lr), ('llm', llm_lr)) if lr}
optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type, optimizer, lr_scales,
                           dtype)
if ckpt:
    if 'sharded' in ckpt:  # a fsdp run's: model and optimizer shards, at any world size, sharded or not
        load_sharded(raw_model, optimizer, os.path.join(out_dir, ckpt['sharded']), trained_only=bool(base))
    else:
        optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt.get('scaler', {}))  # fp16's loss scale (older checkpoints have none)
    iter_num, best_val, evals_since_best = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['evals_since_best']
    data_state, train_time, resume_rng = ckpt['data_order'], ckpt['train_time'], ckpt['rng']
evaluated = iter_num if ckpt else -1  # a checkpoint is written just after an eval: not again on resuming
saved_at = train_time  # training seconds at the last checkpoint (checkpoint_minutes)
ckpt = None

# compile; DDP (a fsdp run's model is sharded already)
if compile:
    model = torch.compile(model)
if ddp and not fsdp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

# logs: metrics.jsonl (+ wandb, TensorBoard), and the rates of the steps since the last log line
logger = MetricsLogger(out_dir, master, iter_num == 0, wandb_log, wandb_project, wandb_run_name, config,
                       tensorboard_log)
throughput = Throughput(model_cfg, vision_mode, llm_mode, lora_param_counts(raw_model), not hf_vlm, device, dtype,
                        world_size, peak_flops)


def evaluate():
    """Val loss, accuracy on held-out questions and caption scores, with their log record and line."""
    raw_model.eval()
    loss = val_loss(raw_model, val_set, tok, max_seq_len, batch_size, val_batches, device, amp, isolate_turns,
                    pad_to_max=attention == 'flex')
    acc, n = qa_accuracy(raw_model, val_set, tok, device, amp, eval_questions)
    captions = caption_scores(raw_model, val_set, tok, device, amp, eval_captions)[0] if eval_captions else {}
    raw_model.train()
    line = (f'eval iter {iter_num}: val loss {loss:.4f} (perplexity {math.exp(loss):.2f})' +
            (f', accuracy on {n} val questions ' + ', '.join(f'{k} {v:.1%}' for k, v in sorted(acc.items()))
             if n else '') + ''.join(f', {k} {v:.3f}' for k, v in captions.items()) +
            f' ({train_time / 60:.1f} min trained)')
    return loss, {'iter': iter_num, 'train_minutes': train_time / 60, 'val_loss': loss,
                  'perplexity': math.exp(loss), 'accuracy': acc, **captions}, line


def save(path, rngs, weights=None, sharded=None):
    """The run as it stands, to resume from. A run that trains only some parts saves those, and how to rebuild
    (and check) its base. With fsdp, weights: the consolidated weights (sharding.full_weights); sharded: the
    directory of the model and optimizer shards that resume loads (sharding.save_sharded; best.pt names none)."""
    resume = {'sharded': sharded} if sharded else {} if fsdp else {'optimizer': optimizer.state_dict()}
    save_checkpoint({'model': weights if fsdp else trained_state_dict(raw_model) if base else raw_state_dict(model),
                     **({'base': base} if base else {}), **resume, 'scaler': scaler.state_dict(),
                     'model_config': model_cfg.to_dict(), 'tokenizer': tok.state(), 'config': config,
                     'iter_num': iter_num, 'best_val_loss': best_val, 'evals_since_best': evals_since_best,
                     'data_order': data_state, 'train_time': train_time, 'rng': rngs}, path)
    if sharded:
        remove_stale_shards(out_dir, keep=sharded)


# -----------------------------------------------------------------------------
# the training loop
loader = step_batches(train_set, DataOrder(len(train_set), seed, **data_state), batch_size, grad_accum, world_size,
                      rank, dict(tokenizer=tok, num_image_tokens=n_img, max_len=max_seq_len,
                                 isolate_turns=isolate_turns, pack=pack_samples,
                                 pad_to_max=attention == 'flex', tiler=getattr(raw_model, 'tiler', None)),
                      num_workers)  # flex: compiled for one length
if resume_rng is not None:  # after all start-up work that draws (model init, the loader workers' seeds)
    set_rng_state(resume_rng[min(rank, len(resume_rng) - 1)] if isinstance(resume_rng, list) else resume_rng)
bar = tqdm(total=max_iters, initial=iter_num, unit='it', dynamic_ncols=True,
           disable=None if master and progress else True)  # None: shown on a terminal only, not in a log file
say = tqdm.write  # prints above the bar
curves = None  # out_dir/training_curves.png once drawn (needs matplotlib)
stats = Counter()  # samples cut at max_seq_len since the start
t_window = 0.0  # seconds of training steps since the last log line
weights = sharded = None  # fsdp: the checkpoint's consolidated weights (rank 0) and its shards' directory
while True:
    lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, max_iters)
    set_lr(optimizer, lr)
    stop = iter_num >= max_iters

    # once in a while: an eval (which writes checkpoints), or a checkpoint alone once checkpoint_minutes of
    # training have passed since the last one (checked at log steps)
    evaluating = (iter_num % eval_interval == 0 or stop) and iter_num != evaluated
    timed = not evaluating and iter_num % log_interval == 0 and \
        checkpoint_due(train_time - saved_at, checkpoint_minutes, master, ddp, device)
    if evaluating or timed:
        rngs = rng_states_of_all_ranks(ddp, world_size)  # every rank's generators (evaluation draws from none)
    if fsdp and (timed or evaluating and iter_num > 0):  # every rank: its shards to disk, the whole weights to rank 0
        sharded = save_sharded(raw_model, optimizer, out_dir, iter_num, trained_only=bool(base))
        weights = full_weights(raw_model, trained_only=bool(base))
    if timed:
        if master:
            save(os.path.join(out_dir, 'ckpt.pt'), rngs, weights, sharded)
            say(f'saved {out_dir}/ckpt.pt ({checkpoint_minutes:g} min of training since the last checkpoint)')
        saved_at = train_time
    if evaluating and fsdp:  # every rank gathers the whole model and evaluates it: the same forwards on each keep
        unshard(raw_model)   # FSDP's record of them (its backward prefetch order) alike; rank 0's figures count
    if evaluating and (master or fsdp):
        loss, record, line = evaluate()
    if evaluating and eval_tasks:  # every rank: the tasks' questions are split over the ranks
        scores = run_tasks(raw_model, tok, eval_tasks, eval_limit, data_dir=data_dir, batch_size=batch_size,
                           image_size=train_set.meta.get('image_size'), amp=amp)
        if master:
            record['benchmarks'] = {f'{t}/{k}': v for t, m in scores.items() for k, v in m.items()
                                    if isinstance(v, (int, float))}
            line += ''.join(f', {k} {v:.3f}' for k, v in record['benchmarks'].items())
    if evaluating and master:
        say(line)
        logger.log(record)
        throughput.remeasure_peak()
        curves = (logger.plot() if plot_curves else None) or curves
        improved = loss < best_val
        best_val, evals_since_best = min(best_val, loss), 0 if improved else evals_since_best + 1
        if iter_num > 0:
            save(os.path.join(out_dir, 'ckpt.pt'), rngs, weights, sharded)  # the latest state, to resume from
            if improved:
                save(os.path.join(out_dir, 'best.pt'), rngs, weights)
            say(f'saved {out_dir}/ckpt.pt' + (' and best.pt' if improved else ''))
            saved_at = train_time
        if early_stop_patience and evals_since_best >= early_stop_patience:
            say(f'early stop: val loss has not improved on {best_val:.4f} for {evals_since_best} evals')
            stop = True
    if evaluating and fsdp:
        reshard(raw_model)
    if evaluating and ddp:  # rank 0 decides; every rank leaves the loop at the same iteration
        flag = torch.tensor(float(stop), device=device)
        torch.distributed.broadcast(flag, 0)
        stop = bool(flag.item())
    if stop:
        break

    # one optimizer step: grad_accum micro-batches on each of world_size processes (evaluation and logging do
    # not count as training time)
    t_step = time.perf_counter()
    micro, n_truncated, next_data_state = next(loader)
    counts = [batch_counts(b, model_cfg.image_token_id) for b in micro]  # on the CPU: no wait for the GPU
    micro = [{key: v.to(device) for key, v in b.items()} for b in micro]
    if n_truncated:
        stats['truncated'] += n_truncated
    # normalise by the supervised tokens of the whole step, over micro-steps and processes
    n_sup = torch.tensor(float(sum(c.supervised for c in counts)), device=device)
    if ddp:
        torch.distributed.all_reduce(n_sup)
    loss_acc = torch.zeros((), device=device)
    for k, batch in enumerate(micro):
        sync = not ddp or k == grad_accum - 1
        if fsdp:  # FSDP2's no_sync: micro-steps before the last keep whole gradients, reduce-scattered at the last
            raw_model.set_requires_gradient_sync(sync)
        with (nullcontext() if sync or fsdp else model.no_sync()):
            with amp():
                loss_sum = model(**batch)
            # DDP averages gradients over processes; multiplying by world_size turns that into a sum
            scaler.scale(loss_sum * world_size / n_sup).backward()
        loss_acc += loss_sum.detach()
    optimizer_step(model, optimizer, scaler, grad_clip)
    throughput.add(counts)
    iter_num, data_state = iter_num + 1, next_data_state
    t_window += time.perf_counter() - t_step
    bar.update()

    # every log_interval steps: the step's loss over all processes, and the rates since the last log line
    if iter_num % log_interval == 0:
        if ddp:
            torch.distributed.all_reduce(loss_acc)
        step_loss = loss_acc.item() / n_sup.item()  # mean over the step's supervised tokens, all processes
        rates, rates_line = throughput.report(t_window)
        train_time, t_window = train_time + t_window, 0.0
        if master:
            logger.log({'iter': iter_num, 'loss': step_loss, 'lr': lr})
            bar.set_postfix_str(f"loss {step_loss:.3f}, {rates['img_s']:.1f} img/s", refresh=False)
            say(f'iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {rates_line}' +
                (f', {dict(stats)}' if stats else ''))

# -----------------------------------------------------------------------------
# the end: weights.pt for sample.py, classify.py and export.py, and the held-out test
bar.close()
best = os.path.join(out_dir, 'best.pt')
if fsdp:  # every rank: best.pt's weights (if any) into the shards, the whole model to rank 0's file and test
    if os.path.exists(best):
        load_full_weights(raw_model, load_checkpoint(best)['model'], trained_only=bool(base))
    weights = full_weights(raw_model, trained_only=bool(base))
    unshard(raw_model)  # rank 0 tests it alone: no backward follows
if master:
    print(f'{iter_num} iterations, {train_time / 60:.1f} min of training')
    # weights.pt, weights only (no optimizer or data state), and the test are of one model: the best checkpoint's
    # (lowest val loss), read on the CPU and copied in; or the last step's. A LoRA run's holds what it trained and
    # its base, for sample.py, classify.py and export.py.
    if os.path.exists(best) and base and not fsdp:
        load_trained_state_dict(raw_model, load_checkpoint(best)['model'], best)
    elif os.path.exists(best) and not fsdp:
        raw_model.load_state_dict(load_checkpoint(best)['model'])
    save_checkpoint({'model': weights if fsdp else trained_state_dict(raw_model) if base else raw_model.state_dict(),
                     'model_config': model_cfg.to_dict(), 'tokenizer': tok.state(), 'config': config,
                     **({'base': base} if base else {})}, os.path.join(out_dir, 'weights.pt'))
    tested = 'best.pt' if os.path.exists(best) else 'the last step'
    print(f'saved {out_dir}/weights.pt (weights of {tested})')
    if test_at_end:
        test_set = VLMDataset(data_dir, 'test')
        raw_model.eval()
        acc, n = qa_accuracy(raw_model, test_set, tok, device, amp, test_questions)
        print(f'held-out test accuracy on {n} questions: ' + ', '.join(f'{k} {v:.1%}' for k, v in sorted(acc.items())))
        with open(os.path.join(out_dir, 'test_accuracy.json'), 'w') as f:
            json.dump({'questions': n, 'accuracy': acc, 'weights': tested, 'iter': iter_num,
                       'train_minutes': train_time / 60}, f)
    if curves:
        print(f'training curves: {curves}')
logger.close()
if ddp:
    finish_distributed()  # rank 0 may still be testing: leave together
