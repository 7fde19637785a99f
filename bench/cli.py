"""The `bench` command line. Exit codes: 0 success, 1 a check failed, 2 bad input or usage."""
from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path

import click

from .errors import BenchError
from .limits import MAX_BATCH, MAX_REPEATS, MAX_RESOLUTION, MAX_SEED, MAX_THREADS


def _close_progress_bars() -> None:
    """Clear progress bars left open by an error, so that its line stands alone on a terminal."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def _user_errors(fn):
    """Turn BenchError into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchError as e:
            _close_progress_bars()
            click.echo("error: " + " ".join(str(e).split("\n")), err=True)  # one line, whatever a library said
            sys.exit(2)
        except OSError as e:
            # a path given on the command line or in bench.toml fails every stat() the same way, wherever
            # it is first looked at
            if e.errno != errno.ENAMETOOLONG:
                raise
            _close_progress_bars()
            click.echo(f"error: the path {e.filename} is too long for the file system (a name over 255 bytes)",
                       err=True)
            sys.exit(2)
    return wrapper


def _progress(quiet: bool = False) -> bool:
    """Progress bars on a terminal only: in a log or a pipe they are noise around the lines that matter."""
    return not quiet and sys.stderr.isatty()


class _UsageError(click.ClickException):
    """A click usage error (a bad option value, a missing option) shown as one `error:` line with exit
    code 2, like every other bad input."""
    exit_code = 2

    def __init__(self, e: click.ClickException):
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        super().__init__(f"{e.format_message()}{hint}")

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class BenchGroup(click.Group):
    """The command group; its usage errors come out as _UsageError."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.ClickException as e:
            raise e if isinstance(e, _UsageError) else _UsageError(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            raise e if isinstance(e, _UsageError) else _UsageError(e) from None


def _int_list_of(minimum: int):
    """A click callback: comma-separated distinct integers >= minimum."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            out = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
        if not out or any(v < minimum for v in out):
            raise click.BadParameter(f"expected integers >= {minimum}, got {value!r}")
        if len(set(out)) != len(out):
            raise click.BadParameter(f"{value!r} repeats a value; give each once")
        return out
    return parse


_int_list, _seed_list = _int_list_of(1), _int_list_of(0)


def _batch_list(ctx, param, value):
    out = _int_list(ctx, param, value)
    if out is not None and max(out) > MAX_BATCH:
        raise click.BadParameter(f"batch sizes go up to {MAX_BATCH}, got {max(out)}")
    return out


def _str_list(ctx, param, value):
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                             help="Protocol file  [default: bench.toml of the project]")
profile_option = click.option("--profile", default=None, help="Overlay [profiles.NAME] of the config.")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output file.")


@click.group(cls=BenchGroup)
@click.version_option(package_name="bench")
def main():
    """Evaluate absorbing-diffusion and autoregressive token priors under one protocol."""


@main.command()
@click.option("--dataset", default=None, help="Dataset of the config  [default: run.dataset, digits]")
@config_option
@profile_option
@click.option("--samplers", callback=_str_list, default=None, help="Comma-separated subset of the rows, e.g. absorbing,data")
@click.option("--steps", callback=_int_list, default=None, help="Comma-separated step counts, overriding the sweep's")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Generated samples per row  [default: from config]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="[default: run.device]")
@click.option("--execution", default=None,
              help="Speed switches, e.g. fast or bf16+skip-idle (bench/execution.py)  [default: the dataset's execution, else run.execution]")
@click.option("--seeds", callback=_seed_list, default=None,
              help="Repeat every sampled row with these seeds (e.g. 0,1,2): mean, SD and a t interval  [default: run.seed]")
@click.option("--run-name", default=None, help="Folder name of the run  [default: a timestamp]")
@click.option("--resume", is_flag=True, help="Continue an unfinished run, keeping its finished rows.")
@click.option("--force", is_flag=True, help="Overwrite an existing run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_user_errors
def run(dataset, config_path, profile, samplers, steps, num_samples, device, execution, seeds, run_name, resume,
        force, quiet):
    """Run the whole protocol and write results/<dataset>/<run-name>/."""
    from .config import load_config, run_settings
    from .distributed import from_env
    from .protocol import run as run_protocol
    settings = run_settings(load_config(config_path, profile), dataset, samplers, steps, num_samples, device,
                            execution, run_name, resume, force, _progress(quiet), seeds)
    run_dir = run_protocol(settings)
    if from_env().is_main:  # under torchrun, rank 0 wrote the results and reports them
        click.echo((run_dir / "results.md").read_text())
        click.echo(f"wrote {run_dir}")


@main.command()
@click.option("--dataset", default="digits", show_default=True)
@click.option("--model", required=True, help="What to train: vq, the absorbing or autoregressive prior, or extractor")
@click.option("--out", default=None, help="Checkpoint stem to write: STEM.safetensors, STEM.json (priors: STEM.resume.pt)")
@click.option("--replace-shipped", is_flag=True, help="Allow writing the shipped builtin:<dataset>/<model> (the default --out).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps; priors: the most, early stopping may end sooner  [default: the shipped recipe]")
@click.option("--resume", is_flag=True, help="Continue a prior's training from STEM.resume.pt.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="torch threads  [default: torch's]")
@config_option
@_user_errors
def train(dataset, model, out, replace_shipped, seed, steps, resume, threads, config_path):
    """Train a digits model; the defaults reproduce the shipped checkpoint."""
    import torch
    from .config import load_config
    from . import train as training
    cfg = load_config(config_path)
    ds = cfg.dataset(dataset)
    out = training.check_output(out, dataset, model, replace_shipped)
    if threads:
        torch.set_num_threads(threads)
    record = training.train_model(cfg, ds, model, out, seed, steps, progress=_progress(), resume=resume)
    click.echo(f"wrote {out}: {record}")


@main.command()
@click.option("--sampler", required=True, help="absorbing, autoregressive, maskgit, random-codes, ...")
@click.option("--dataset", default=None)
@click.option("--steps", type=click.IntRange(min=1), default=None)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 means argmax")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--num", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--first-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample indices first-index .. first-index+num-1")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--execution", default=None, help="Speed switches (bench/execution.py)  [default: the dataset's execution, else run.execution]")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="FILE.npz with tokens and images")
@force_option
@config_option
@_user_errors
def sample(sampler, dataset, steps, temperature, top_k, top_p, num, seed, first_index, batch_size, device, execution,
           out, force, config_path):
    """Draw samples: FILE.npz holds `tokens` (N, h, w) int64 and `images` (N, H, W, C) uint8."""
    from .config import load_config
    from .protocol import sample_to_file
    cfg = load_config(config_path)
    ds = cfg.dataset(dataset)
    line = sample_to_file(cfg, ds, sampler, steps, temperature, top_k, top_p, num, seed,
                          first_index, batch_size, device or cfg.run.device, execution or cfg.execution(ds),
                          Path(out), force, _progress())
    click.echo(line)


@main.command()
@config_option
@_user_errors
def datasets(config_path):
    """What is configured, and whether its files are present."""
    from .config import load_config
    from .protocol import describe_dataset
    cfg = load_config(config_path)
    for name, ds in cfg.datasets.items():
        for line in describe_dataset(cfg, ds):
            click.echo(line)


@main.command()
@click.option("--from", "source", type=click.Choice(["official-ut"]), required=True,
              help="official-ut: the files of github.com/samb-t/unleashing-transformers")
@click.option("--vqgan", type=click.Path(dir_okay=False), required=True, help="vqgan_ema_<step>.th")
@click.option("--absorbing", type=click.Path(dir_okay=False), default=None, help="absorbing_ema_<step>.th")
@click.option("--autoregressive", type=click.Path(dir_okay=False), default=None, help="autoregressive_ema_<step>.th")
@click.option("--preset", default=None, help="Official hyperparameters of a dataset: churches, bedrooms, ffhq")
@click.option("--hparams", "hparams_file", type=click.Path(dir_okay=False), default=None,
              help="FILE.json: an object of official flag names (nf, ch_mult, bert_n_layers, ...); "
                   "\"dataset\": \"churches\" starts from that preset")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the harness checkpoints vq, absorbing, autoregressive (.safetensors + .json)")
@click.option("--trust-checkpoint", is_flag=True,
              help="Also load files whose pickle needs more than tensors (this runs code from the file).")
@click.option("--force", is_flag=True, help="Overwrite checkpoints already in --out.")
@_user_errors
def convert(source, vqgan, absorbing, autoregressive, preset, hparams_file, out, trust_checkpoint, force):
    """Convert official checkpoints to the harness format (tensors and hyperparameters only)."""
    import json
    from .loading.official import convert_official
    if (preset is None) == (hparams_file is None):
        raise BenchError("give exactly one of --preset NAME and --hparams FILE.json")
    hparams = preset
    if hparams_file is not None:
        try:
            hparams = json.loads(Path(hparams_file).read_text())
        except FileNotFoundError:
            raise BenchError(f"hyperparameter file {hparams_file} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BenchError(f"hyperparameter file {hparams_file} is not valid JSON ({e})") from None
        if not isinstance(hparams, dict):
            raise BenchError(f"hyperparameter file {hparams_file} must hold a JSON object of official flags")
    written = convert_official(vqgan, absorbing, autoregressive, hparams=hparams, out_dir=out,
                               trust=trust_checkpoint, force=force)
    for kind, (stem, source) in written.items():
        click.echo(f"wrote {stem}.safetensors and .json ({kind}, from {source})")


@main.command()
@click.option("--dataset", default=None, help="Time this dataset's configured models  [default: run.dataset]")
@click.option("--shape", type=click.Choice(["churches", "tiny"]), default=None,
              help="Time random weights at a named model shape instead of a dataset's models.")
@click.option("--samplers", callback=_str_list, default=None,
              help="Comma-separated samplers  [default: every one whose prior is there, without recompute variants]")
@click.option("--steps", callback=_int_list, default=None, help="Step counts of step-taking samplers  [default: 1,4,16,64 or 50,256]")
@click.option("--execution", "executions", multiple=True, default=("plain",), show_default=True,
              help="Speed switches (bench/execution.py), e.g. plain, fast, bf16+skip-idle; repeat to time several.")
@click.option("--batch-size", callback=_batch_list, default=None, help="Comma-separated batch sizes  [default: timing.batch_size]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--features/--no-features", default=True, show_default=True,
              help="Time feature extraction too (the dataset's extractor; inception-v3-compat for --shape).")
@click.option("--warmup", type=click.IntRange(0, MAX_REPEATS), default=None, help="[default: timing.warmup]")
@click.option("--repeats", type=click.IntRange(1, MAX_REPEATS), default=None, help="[default: timing.repeats]")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for results.json/csv/md  [default: <results_dir>/perf/<timestamp>]")
@click.option("--estimate-samples", type=click.IntRange(min=1), default=50000, show_default=True,
              help="Also state the hours one row of this many samples takes at the measured img/s.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out folder's results.")
@config_option
@_user_errors
def perf(dataset, shape, samplers, steps, executions, batch_size, device, features, warmup, repeats, out,
         estimate_samples, force, config_path):
    """Timing only: per-phase times, img/s, NFE, MFU and peak memory of each sampler x execution x batch."""
    from .config import load_config
    from .perf import run_perf_command
    cfg = load_config(config_path)
    text, out = run_perf_command(cfg, dataset, shape, samplers, steps, executions, batch_size, device, features,
                                 warmup, repeats, Path(out) if out else None, estimate_samples, force,
                                 progress=_progress())
    click.echo(text)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("run_dir", required=False)
@click.option("--dataset", default=None, help="Where to look for the latest run  [default: run.dataset]")
@config_option
@_user_errors
def figures(run_dir, dataset, config_path):
    """Rebuild the tables and figures of a stored run from its results alone."""
    from .compare import find_run
    from .config import load_config
    from .report import write_all
    from .results import load_run, refuse_published
    cfg = load_config(config_path)
    run_dir = find_run(cfg.results_dir(), dataset or cfg.run.dataset, run_dir)
    refuse_published(run_dir, "writes tables or figures")
    manifest, rows = load_run(run_dir)
    for path in write_all(run_dir, manifest, rows):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("ref")
@click.argument("run_dir", required=False)
@click.option("--dataset", default=None, help="Dataset whose runs REF and RUN name  [default: run.dataset]")
@click.option("--allow-mismatch", is_flag=True, help="Compare runs whose protocols differ.")
@click.option("--json", "as_json", is_flag=True)
@config_option
@_user_errors
def compare(ref, run_dir, dataset, allow_mismatch, as_json, config_path):
    """Side-by-side deltas of RUN (default: the latest) against stored run REF (a path or a name
    under results/<dataset>/, e.g. `paper` or `baseline`)."""
    import json
    from .compare import compare_runs, find_run, format_comparison
    from .config import Thresholds, load_config
    cfg = load_config(config_path)
    dataset = dataset or cfg.run.dataset
    ref_dir = find_run(cfg.results_dir(), dataset, ref)
    run_dir = find_run(cfg.results_dir(), dataset, run_dir)
    cmp = compare_runs(ref_dir, run_dir, cfg.thresholds.get(dataset, Thresholds()), allow_mismatch)
    click.echo(json.dumps(cmp, indent=2) if as_json else format_comparison(cmp))


@main.command()
@click.argument("run_dir", required=False)
@click.option("--dataset", default=None, help="[default: the run's dataset, else run.dataset]")
@click.option("--baseline", default="baseline", show_default=True,
              help="Stored run to compare against, a path or a name under results/<dataset>/")
@click.option("--json", "as_json", is_flag=True)
@config_option
@_user_errors
def check(run_dir, dataset, baseline, as_json, config_path):
    """Exit 1 where a threshold of bench.toml is breached, else 0."""
    import json
    from .compare import check_run, find_run
    from .config import load_config
    from .results import load_run
    cfg = load_config(config_path)
    run_dir = find_run(cfg.results_dir(), dataset or cfg.run.dataset, run_dir)
    dataset = load_run(run_dir)[0]["dataset"]
    thresholds = cfg.thresholds.get(dataset)
    if thresholds is None:
        raise BenchError(f"{cfg.path} sets no [thresholds.{dataset}]; nothing to check")
    base = None
    try:
        base = find_run(cfg.results_dir(), dataset, baseline)
    except BenchError:
        if baseline != "baseline":
            raise
    if base is not None:
        load_run(base)  # a damaged baseline is bad input (exit 2), not a failed check
    result = check_run(run_dir, thresholds, base)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"check {run_dir} against {base or 'no baseline'}")
        for line in result["checks"]:
            click.echo(f"  {line}")
        for line in result["failures"]:
            click.echo(f"  FAILED: {line}")
        click.echo("passed" if result["passed"] else f"failed: {len(result['failures'])} breach(es)")
    sys.exit(0 if result["passed"] else 1)



def _config_if_any(config_path):
    """The config when one is given or found; None where bench runs outside a project."""
    from .config import DEFAULT_CONFIG, load_config
    if config_path is None and not Path("bench.toml").is_file() and not DEFAULT_CONFIG.is_file():
        return None
    return load_config(config_path)


@main.command("features")
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.option("--extractor", "extractor_name", required=True,
              help="digits, inception-v3-compat, clip or dinov2")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="FILE.npz to write")
@click.option("--resolution", type=click.IntRange(1, MAX_RESOLUTION), default=None,
              help="Images are resized (shorter side) and centre-cropped to this side  [default: the extractor's "
                   "input size (digits: 16); for extractors that resize themselves, the first image's shorter "
                   "side, so same-sized square images pass unchanged]")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True,
              help="Decode as grey (1) or RGB (3)")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--weights", default=None,
              help="Extractor weights (digits: a checkpoint stem)  [default: inception: metrics.inception_weights, $BENCH_INCEPTION_WEIGHTS "
                   "or the caches; clip/dinov2: $BENCH_CLIP_WEIGHTS / $BENCH_DINOV2_WEIGHTS]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@force_option
@config_option
@_user_errors
def features_command(images_dir, extractor_name, out, resolution, channels, batch_size, device, weights, quiet,
                     force, config_path):
    """Features of every image under IMAGES_DIR (recursively, sorted by path).

    FILE.npz holds `features` (N, D) float64, `files` (relative paths, in the same order),
    `extractor`, `weights_sha256`, `resolution` and `channels`."""
    from .features import features_of_folder
    cfg = _config_if_any(config_path)
    if weights is None and cfg is not None:
        weights = cfg.extractor_weights(extractor_name)
    click.echo(features_of_folder(images_dir, extractor_name, Path(out), resolution, int(channels), batch_size,
                                  device, weights, _progress(quiet), force))


@main.command()
@click.argument("real", type=click.Path(dir_okay=False))
@click.argument("fake", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--memorisation", is_flag=True, help="Also the memorisation score (REAL taken as the training set).")
@click.option("--cleanfid", is_flag=True, help="Also FID by clean-fid's formula on the same statistics, as a cross-check.")
@config_option
@_user_errors
def score(real, fake, as_json, memorisation, cleanfid, config_path):
    """Metrics of FAKE against REAL, two files written by `bench features` with the same extractor."""
    import json
    from .features import load_feature_file
    from .metrics import compute_metrics
    r, f = load_feature_file(real), load_feature_file(fake)
    if r["extractor"] != f["extractor"]:
        raise BenchError(f"{real} holds {r['extractor']!r} features and {fake} {f['extractor']!r} features; "
                         f"score features of the same extractor")
    if r["weights_sha256"] != f["weights_sha256"]:
        raise BenchError(f"{real} and {fake} used different {r['extractor']!r} weights "
                         f"(sha256 {r['weights_sha256'][:12]}... vs {f['weights_sha256'][:12]}...)")
    cfg = _config_if_any(config_path)
    settings = {**cfg.metrics.as_dict(), "seed": cfg.run.seed} if cfg is not None else {}
    settings["memorisation"] = memorisation
    result = compute_metrics(f["features"], r["features"], settings)
    if cleanfid:
        from .metrics import cleanfid_cross_check
        result["fid_cleanfid"] = cleanfid_cross_check(f["features"], r["features"])["fid_cleanfid"]
    if as_json:
        click.echo(json.dumps({"real": real, "fake": fake, "extractor": r["extractor"],
                               "weights_sha256": r["weights_sha256"], "n_real": len(r["features"]),
                               "n_fake": len(f["features"]), **result}, indent=2))
        return
    click.echo(f"real  {real} ({len(r['features'])} samples)")
    click.echo(f"fake  {fake} ({len(f['features'])} samples)")
    click.echo(f"extractor {r['extractor']} (weights sha256 {r['weights_sha256'][:12]})")
    for key, value in result.items():
        click.echo(f"  {key:<16}{value:>12.6g}" if isinstance(value, float) else f"  {key:<16}{value:>12}")

if __name__ == "__main__":
    main()
