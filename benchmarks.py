"""
Standard VLM benchmarks through lmms-eval: a glimpse model behind lmms-eval's model interface, and run_tasks(),
which eval.py calls once and a training run at each eval. lmms-eval defines the tasks, builds the prompts and
scores the answers; nothing here scores anything. It is optional: imported inside functions only, and its absence
is a one-line error that says how to install it.

    GlimpseLMM        lmms-eval's `lmms` interface (generate_until, loglikelihood) around a glimpse VLM or a
                      Hugging Face one (pretrained.HFVLM), batched, on whatever device the model is on
    local_task_data   the questions of eval_tasks/ (shapes_pope, shapes_mmstar) as parquet files made from a
                      glimpse dataset's test split, in POPE's and MMStar's published schemas
    run_tasks         lmms_eval.evaluator.simple_evaluate, one task at a time -> {task: {metric: value}}
"""
import difflib
import io
import json
import os
import random
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from data import VLMDataset, image_pixels
from errors import GlimpseError
from tokenizer import HFProcessor


def require_lmms_eval():
    """lmms-eval, or a one-line error with the command that installs it beside the torch glimpse runs on (left
    alone, pip may replace torch with another build). filelock < 4: lmms-eval 0.7 patches filelock 3's locks
    (evaluator._enable_reentrant_filelocks imports filelock._api, which filelock 4 no longer has)."""
    try:
        import filelock._api  # noqa: F401
        import lmms_eval.evaluator  # noqa: F401
    except ImportError as e:
        from importlib.metadata import version
        pins = ' '.join(f"{p}=={version(p).split('+')[0]}" for p in ('torch', 'torchvision'))
        raise GlimpseError(f"eval error: lmms-eval cannot be imported ({e}); install it with: "
                           f"pip install lmms-eval 'filelock<4' {pins}")


# -----------------------------------------------------------------------------
# the model

class GlimpseLMM:
    """lmms-eval's model interface around a glimpse VLM and its tokenizer, or a pretrained.HFVLM and its processor.
    Use lmms_model() to make one: it is then also an instance of lmms-eval's `lmms` base class, which
    simple_evaluate asks for. Each question comes with its one image, fitted to image_size as prepare_data.py fits
    a dataset's images (the tower then resizes it as it did in training; give the run's data image size so that a
    benchmark's images reach the model as its training images did); a Hugging Face VLM's processor takes the
    image as it is. A question with no image or several is answered '' and counted in `skipped`: glimpse models
    take one image per question."""
    is_simple = True  # lmms-eval hands generate_until (context, gen_kwargs, doc_to_visual, doc_id, task, split)

    def __init__(self, model, tokenizer, batch_size=32, image_size=None, amp=nullcontext, progress=False):
        super().__init__()  # lmms: rank 0 of 1, task_dict
        self.model, self.tok, self.batch_size, self.amp, self.progress = model, tokenizer, batch_size, amp, progress
        self.hf = isinstance(tokenizer, HFProcessor)
        # a model that splits images (tiling.py) takes them as they are, as a Hugging Face VLM's processor does
        self.image_size = None if self.hf or getattr(model, 'tiler', None) is not None else image_size or model.cfg.vision.image_size
        self.device = next(model.parameters()).device
        self.skipped = 0
        if dist.is_initialized():  # lmms-eval splits the requests over the ranks (distributed_executor_backend)
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def image(self, request):
        """The request's one image as uint8 (S, S, 3) pixels (HF: as it is), or None."""
        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):  # none, several, or a video path
            return None
        return image_pixels(visuals[0], self.image_size)

    def answer(self, images, prompts, max_new_tokens, **sampling):
        pixels = images if self.hf or self.image_size is None else np.stack(images)  # (B, S, S, 3)
        with self.amp():
            return self.model.chat(self.tok, pixels, prompts, max_new_tokens, **sampling)

    def generate_until(self, requests):
        """Greedy answers (sampled when a task asks for do_sample), batched among requests with the same
        generation kwargs, each cut at the first of the task's `until` strings."""
        answers = [''] * len(requests)
        groups = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc='answering', disable=not self.progress or self.rank != 0)
        for idx in groups.values():
            gen = requests[idx[0]].args[1]
            until = gen.get('until') or []
            until = [until] if isinstance(until, str) else until
            sampling = dict(temperature=float(gen['temperature']), top_p=gen.get('top_p')) \
                if gen.get('do_sample') and gen.get('temperature') else {}
            for s in range(0, len(idx), self.batch_size):
                chunk = [(i, self.image(requests[i])) for i in idx[s:s + self.batch_size]]
                chunk = [(i, im) for i, im in chunk if im is not None]
                self.skipped += min(self.batch_size, len(idx) - s) - len(chunk)
                if chunk:
                    texts = self.answer([im for _, im in chunk], [requests[i].args[0] for i, _ in chunk],
                                        int(gen.get('max_new_tokens', 128)), **sampling)
                    for (i, _), t in zip(chunk, texts):
                        answers[i] = min((t.split(u)[0] for u in until if u), key=len, default=t)
                bar.update(min(self.batch_size, len(idx) - s))
        bar.close()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests):
        """(sum of log p(continuation tokens | image, context), whether greedy decoding would write them), the
        continuation as the assistant's answer under the chat template, its end-of-turn token left out (it scores
        whether the answer stops there). glimpse models only."""
        if self.hf:
            raise NotImplementedError('loglikelihood (multiple_choice) tasks need a glimpse model; a Hugging Face VLM '
                                      'answers generate_until tasks here')
        n_img, out = self.model.num_image_tokens, []
        for s in range(0, len(requests), self.batch_size):
            seqs, starts, images = [], [], []
            for r in requests[s:s + self.batch_size]:
                context, target, _, doc_id, task, split = r.args
                doc = self.task_dict[task][split][doc_id]
                continuation = (target if isinstance(target, str) else str(target(doc))).strip()
                turns = [{'role': 'user', 'content': '<image>\n' + context}]
                image = self.image(r)
                if image is None:
                    raise GlimpseError('eval error: a loglikelihood request without exactly one image; glimpse '
                                       'models take one image per question here')
                pixels, grids = self.model.image_inputs([image])  # tiles, when the model splits images
                prompt, _ = self.tok.encode_chat(turns, n_img, add_generation_prompt=True, grids=grids)
                ids, sup = self.tok.encode_chat(turns + [{'role': 'assistant', 'content': continuation}], n_img,
                                                grids=grids)
                if ids[:len(prompt)] != prompt:
                    raise ValueError('the chat template does not extend the generation prompt with the answer')
                cont = [t for t, m in zip(ids[len(prompt):], sup[len(prompt):]) if m][:-1]  # not the end of turn
                seqs.append(prompt + cont)
                starts.append(len(prompt))
                images.append(pixels)
            T = max(map(len, seqs))
            ids = torch.full((len(seqs), T), self.tok.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), T), dtype=torch.bool)
            for k, q in enumerate(seqs):  # right-padded: every row has the positions it would have alone
                ids[k, :len(q)], mask[k, :len(q)] = torch.tensor(q), True
            with self.amp():
                logits = self.model(ids.to(self.device), torch.cat(images).to(self.device),
                                    mask.to(self.device))
            logp = logits.float().log_softmax(-1).cpu()  # (B, T, V)
            for k, (q, a) in enumerate(zip(seqs, starts)):
                if a == len(q):  # an empty continuation
                    out.append((0.0, True))
                    continue
                target = torch.tensor(q[a:])
                lp = logp[k, a - 1:len(q) - 1]  # the positions that predict the continuation
                out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError('multi-round tasks are not supported by glimpse models yet')

    def clean(self):
        pass  # lmms.clean() deletes the model's attributes; the model is the caller's (a training run goes on)


_lmms_class = None


def lmms_model(model, tokenizer, **kwargs):
    """A GlimpseLMM that is also an instance of lmms-eval's `lmms` base class (imported here, not at import time:
    glimpse runs without lmms-eval). kwargs: GlimpseLMM's."""
    global _lmms_class
    if _lmms_class is None:
        require_lmms_eval()
        from lmms_eval.api.model import lmms
        _lmms_class = type('GlimpseLMM', (GlimpseLMM, lmms), {})
    return _lmms_class(model, tokenizer, **kwargs)


# -----------------------------------------------------------------------------
# the local tasks' questions (eval_tasks/*.yaml): a glimpse dataset's test split in real benchmarks' schemas

# shapes question types -> MMStar's L2 categories, all under its 'fine-grained perception'
MMSTAR_L2 = {'count': 'object counting', 'position': 'localization', 'color': 'recognition', 'shape': 'recognition'}


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format='PNG')  # lossless: the pixels trained on
    return {'bytes': buf.getvalue(), 'path': None}


def is_yes_no(qa):
    return qa['a'].strip().lower() in ('yes', 'no')


def pope_rows(ds):
    """POPE's schema (lmms-lab/POPE): every held-out question answered yes or no (shapes: 'is there a green
    square?'). POPE's category names how its negatives were drawn; here it is the dataset's own 'shapes'."""
    rows = []
    for r in ds.records:
        for qa in filter(is_yes_no, r.get('qa', [])):
            n = str(len(rows))
            rows.append({'id': n, 'question_id': n, 'question': qa['q'], 'answer': qa['a'].strip().lower(),
                         'image_source': r.get('id', str(r['image'])), 'image': png(ds.images[r['image']]),
                         'category': ds.meta.get('source', 'glimpse')})
    return rows


def mmstar_rows(ds):
    """MMStar's schema (Lin-Chen/MMStar): every other held-out question as multiple choice, its answer and up to
    three others of its type from the split's answers ('Options: A: red, B: blue, C: cyan, D: green'; fewer for a
    type with fewer answers), in an order drawn per question with a fixed seed; the answer is the letter. Category
    'fine-grained perception', the L2 category MMSTAR_L2's."""
    answers = defaultdict(set)
    for r in ds.records:
        for qa in r.get('qa', []):
            answers[qa['type']].add(qa['a'])
    rows = []
    for r in ds.records:
        for j, qa in enumerate(q for q in r.get('qa', []) if not is_yes_no(q)):
            others = sorted(answers[qa['type']] - {qa['a']})
            if not others:
                continue
            rng = random.Random(f"{r.get('id', r['image'])}/{j}")
            options = rng.sample(others, min(3, len(others))) + [qa['a']]
            rng.shuffle(options)
            letters = 'ABCD'[:len(options)]
            listed = ', '.join(f'{c}: {o}' for c, o in zip(letters, options))
            rows.append({'index': len(rows), 'question': f"{qa['q']}\nOptions: {listed}",
                         'image': png(ds.images[r['image']]), 'answer': letters[options.index(qa['a'])],
                         'category': 'fine-grained perception', 'l2_category': MMSTAR_L2.get(qa['type'], qa['type']),
                         'meta_info': {'source': ds.meta.get('source', 'glimpse'), 'split': 'test',
                                       'image_path': r.get('id', str(r['image']))},
                         'bench': ds.meta.get('source', 'glimpse')})
    return rows


LOCAL_TASKS = {'shapes_pope': pope_rows, 'shapes_mmstar': mmstar_rows}


def local_task_data(task, data_dir):
    """data_dir/lmms_eval/<task>.parquet, made from data_dir's test split when it is absent or older than
    test.jsonl (written to a temporary file and renamed). Returns its absolute path."""
    path = os.path.join(data_dir, 'lmms_eval', f'{task}.parquet')
    source = os.path.join(data_dir, 'test.jsonl')
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(source):
        return os.path.abspath(path)
    if dist.is_initialized() and dist.get_rank() != 0:  # rank 0 writes it; the others wait below
        dist.barrier()
        return os.path.abspath(path)
    import datasets
    ds = VLMDataset(data_dir, 'test')
    rows = LOCAL_TASKS[task](ds)
    if not rows:
        raise GlimpseError(f'data error: {source} has no questions for {task} (shapes_pope: questions answered '
                           f'yes or no; shapes_mmstar: questions of a type with two or more answers)')
    table = datasets.Dataset.from_list(rows).cast_column('image', datasets.Image())  # PNG bytes -> an Image feature
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp'
    table.to_parquet(tmp)
    os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return os.path.abspath(path)


# -----------------------------------------------------------------------------
# running tasks

# glimpse's own task YAMLs (LOCAL_TASKS), always indexed
EVAL_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'eval_tasks')
_task_managers = {}


def task_manager(include_path, tasks):
    """lmms-eval's TaskManager over eval_tasks/ and include_path (a folder of more YAMLs) alone when they hold every
    task asked for (indexing lmms-eval's own ~2000 task YAMLs takes seconds), else over lmms-eval's tasks too; each
    kept for the next call."""
    from lmms_eval.tasks import TaskManager
    if include_path and not os.path.isdir(include_path):
        raise GlimpseError(f'eval error: include_path={include_path} is not a folder of task YAMLs')
    paths = [EVAL_TASKS] + ([include_path] if include_path and os.path.abspath(include_path) != EVAL_TASKS else [])
    for defaults in (False, True):
        key = (tuple(paths), defaults)
        if key not in _task_managers:
            _task_managers[key] = TaskManager('WARNING', include_path=paths, include_defaults=defaults)
        if defaults or all(t in _task_managers[key].all_tasks for t in tasks):
            return _task_managers[key]


@contextmanager
def own_rng():
    """simple_evaluate seeds Python's, NumPy's and torch's global generators; the caller gets its own back."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def scores(task_results):
    """lmms-eval's results for one task ({'pope_accuracy,none': 0.9, 'pope_accuracy_stderr,none': 'N/A', 'alias':
    ...}) -> {'pope_accuracy': 0.9}: the metrics of the default filter, no standard errors."""
    out = {}
    for key, value in task_results.items():
        metric, _, _ = key.partition(',')
        if isinstance(value, (int, float)) and not isinstance(value, bool) and '_stderr' not in metric:
            out[metric] = float(value)
    return out


LOGGED = {'doc_id', 'doc', 'target', 'arguments', 'resps', 'filtered_resps', 'token_counts', 'doc_hash',
          'prompt_hash', 'target_hash', 'filter', 'metrics', 'input'}


def sample_record(s):
    """One of lmms-eval's logged samples -> its doc (images left out), the question as asked, the target, the answer
    after the task's filters, and each metric's per-sample value (what process_results returned, which the
    aggregation functions read)."""
    args = s.get('arguments') or []
    first = args[0] if args and isinstance(args[0], (list, tuple)) else args  # multiple choice: one per option
    answers = s.get('filtered_resps') or []
    return {'doc_id': s.get('doc_id'), 'doc': s.get('doc'),
            'question': first[0] if first and isinstance(first[0], str) else None, 'target': s.get('target'),
            'answer': answers[0] if len(answers) == 1 else answers, **{k: v for k, v in s.items() if k not in LOGGED}}


def write_report(path, results, name, metrics, n, limit, seconds, cpu_seconds, blank):
    """<task>.json: lmms-eval's metrics and every sample (sample_record), with what it cost; seconds and CPU seconds
    are those of the whole simple_evaluate call (a group's: all its tasks). Written to a temporary file, renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    report = {'task': name, 'metrics': metrics, 'samples_evaluated': n, 'limit': limit, 'seconds': seconds,
              'cpu_seconds': cpu_seconds, 'answered_blank_without_one_image': blank,
              'lmms_eval_version': results.get('lmms_eval_version'), 'config': results.get('configs', {}).get(name),
              'samples': sorted(map(sample_record, results.get('samples', {}).get(name, [])),
                                key=lambda s: s['doc_id'])}  # under torchrun the ranks' shares interleave
    with open(path + '.tmp', 'w') as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(path + '.tmp', path)


def run_tasks(model, tokenizer, tasks, limit=0, include_path='', data_dir='', batch_size=32, image_size=None,
              amp=nullcontext, results_dir='', progress=False):
    """lmms-eval's tasks on a glimpse VLM (or pretrained.HFVLM) -> {task: {metric: value}} (a group: the group and
    each of its tasks), via lmms_eval.evaluator.simple_evaluate with GlimpseLMM, one task at a time.

    tasks: names or 'pope,mmstar'; limit: the first N questions of each (0: all); include_path: a folder of more
    task YAMLs (glimpse's eval_tasks/ is always included); data_dir: the glimpse dataset whose test split the local
    tasks (LOCAL_TASKS) are made from; image_size: what each image is fitted to (the run's data image size; None:
    the tower's); amp: a function that returns the autocast context; results_dir: where to write <task>.json
    (lmms-eval's metrics, every sample's question, target, answer and per-sample scores, the seconds it took);
    progress: a bar while answering and one line per task.
    The model is put in eval mode and given back in the mode it was in; the global random generators are left as
    they were. Under torch.distributed every rank must call it: the requests are split over the ranks, and rank 0
    returns the scores (the others {})."""
    require_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate
    tasks = [t.strip() for t in tasks.split(',') if t.strip()] if isinstance(tasks, str) else list(tasks)
    manager = task_manager(include_path, tasks)
    for t in tasks:
        if t not in manager.all_tasks:
            close = difflib.get_close_matches(t, manager.all_tasks, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise GlimpseError(f"eval error: no task '{t}'{hint} in lmms-eval, eval_tasks/ or include_path")
        if t in LOCAL_TASKS and not data_dir:
            raise GlimpseError(f'eval error: {t} is made from a glimpse dataset\'s test split; give its data_dir')
    lm = lmms_model(model, tokenizer, batch_size=batch_size, image_size=image_size, amp=amp, progress=progress)
    master = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    training = model.training
    model.eval()
    try:
        for t in tasks:
            spec = {'task': t, 'dataset_kwargs': {'data_files': {'test': local_task_data(t, data_dir)}}} \
                if t in LOCAL_TASKS else t
            t0, cpu0, skipped0 = time.perf_counter(), time.process_time(), lm.skipped
            with own_rng():
                results = simple_evaluate(model=lm, tasks=[spec], limit=limit or None, task_manager=manager,
                                          log_samples=bool(results_dir), bootstrap_iters=0,
                                          distributed_executor_backend='torchrun', verbosity='WARNING')
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
            if not master or results is None:
                continue
            blank = lm.skipped - skipped0
            for name, metrics in results['results'].items():  # a group: the group (if it aggregates), its tasks
                if not scores(metrics):
                    continue
                out[name] = scores(metrics)
                n = results.get('n-samples', {}).get(name, {}).get('effective')
                if results_dir:
                    write_report(os.path.join(results_dir, f'{name}.json'), results, name, out[name], n, limit,
                                 seconds, cpu_seconds, blank)
                if progress:
                    cost = f'{n} samples, {seconds:.1f} s, {1000 * seconds / n:.0f} s per 1000' if n else \
                        f'{seconds:.1f} s'
                    print(f"{name}: {', '.join(f'{k} {v:.4f}' for k, v in out[name].items())} ({cost}" +
                          (f', {blank} without one image answered blank' if blank else '') + ')' +
                          (f' -> {os.path.join(results_dir, name)}.json' if results_dir else ''))
    finally:
        model.train(training)
    return out
