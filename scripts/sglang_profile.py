"""Where one SGLang decoding round goes, per mode and concurrency: SGLang's own torch profiler (/start_profile) over
`--steps` steady decode forwards of its scheduler, summarised per round (GPU machine only).

  scripts/device/env.sh python scripts/sglang_profile.py --concurrency 1,16 --steps 40 --rate-s 8 --out /tmp/prof \
      --mode plain="@sglang $SA" --mode aurora="--engine sglang --draft scratch --sglang-args='$SA'"

Modes as in speedup_run.py (`@sglang ARGS`: plain SGLang; else `aurora serve ARGS`, whose SGLang is found from its
log). Load goes straight to SGLang's /generate: `C` clients, each request a distinct random token-id prompt
(`--prompt-len`, ids below 32,000: valid for every target here) and `--max-tokens` new tokens with ignore_eos, so
the profiled window is steady decoding at C running requests. Request ids start with "c-", so Aurora's plugin
captures them as it captures served traffic (`--uncaptured`: "n-", not captured). Per round the table gives: wall
time, GPU busy time (union of kernels and copies), kernel and graph launches, the round's host time split by
SGLang's stage annotations (draft, draft_extend; see `stages`), and with
`--stack` the inclusive time of each Python function of the scheduler thread (Aurora's wrappers among them; the
Python tracer slows every call, so read that column for shares, not for absolute time), and the GPU time of each
kernel or copy by name.
`--rate-s S` first times served tokens/s for S seconds on three routes: the OpenAI route users call (Aurora's front,
or plain SGLang's own; token-id prompts), SGLang's /generate in one response, and /generate streamed as Aurora's
engine calls it, with the CPU the front process used meanwhile; `--spy` adds a py-spy summary of the front process
over the OpenAI-route window (`spy_<mode>_c<C>.txt`; py-spy on PATH), `--spy-scheduler` one of SGLang's scheduler
process over the /generate window, per thread, idle samples included (`spy_sched_<mode>_c<C>.txt`: where the
scheduler thread's round goes, its waits on the GPU among it). `--rate-only` skips the profile. Writes
<out>/profile.json.
"""
import argparse
import ast
import asyncio
import glob
import gzip
import json
import os
import random
import re
import shutil
import time
from collections import Counter, defaultdict

import httpx

from aurora.server.protocol import NONSTREAM_INTERVAL
from speedup_run import free_port, start_server, stop_server

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def sglang_url(mode_args: str, port: int, log_path: str) -> str:
    if mode_args.startswith("@sglang"):
        return f"http://127.0.0.1:{port}"
    with open(log_path, errors="replace") as f:
        ports = re.findall(r"starting SGLang: .*?--port (\d+)", f.read())
    if not ports:
        raise RuntimeError(f"no SGLang start line in {log_path}")
    return f"http://127.0.0.1:{ports[-1]}"


async def load(url: str, concurrency: int, prompt_len: int, max_tokens: int, stop: asyncio.Event,
               route: str = "generate", model: str | None = None, rid_prefix: str = "c-") -> list[float]:
    """Closed-loop clients until `stop`; returns the completion time of every finished request. route "generate":
    SGLang's /generate, one response; "generate_stream": the same as Aurora's SGLang engine sends it for a
    non-streaming request (streamed, an output every NONSTREAM_INTERVAL tokens, read line by line); "openai": `url`'s /v1/completions (token-id prompts) with
    `model`, one response. `rid_prefix` "c-": Aurora's plugin captures the requests for training, "n-": it does
    not (aurora/sglang_engine/engine.py)."""
    rng, done = random.Random(concurrency), []

    async def client(h, c):
        i = 0
        while not stop.is_set():
            ids = [rng.randrange(100, 32000) for _ in range(prompt_len)]
            body = {"input_ids": ids, "rid": f"{rid_prefix}prof-{c}-{i}-{time.monotonic_ns()}",
                    "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
            if route == "generate_stream":
                body.update(stream=True)
                body["sampling_params"]["stream_interval"] = NONSTREAM_INTERVAL
            elif route == "openai":
                body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            i += 1
            try:
                if route == "generate_stream":
                    async with h.stream("POST", "/generate", json=body) as r:
                        async for _ in r.aiter_lines():
                            pass
                else:
                    r = await h.post("/generate" if route == "generate" else "/v1/completions", json=body)
                if r.status_code == 200:
                    done.append(time.perf_counter())
            except httpx.HTTPError:
                return

    async with httpx.AsyncClient(base_url=url, timeout=None) as h:
        tasks = [asyncio.create_task(client(h, c)) for c in range(concurrency)]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done


def spy_summary(raw: str, top: int = 45, threads: bool = False) -> str:
    """py-spy's raw stacks -> the share of samples in which each function was on the stack (inclusive), and the
    lines the samples ended on (self: a native call, or a wait for the GIL or a lock, counts on the Python line
    that made it). `threads`: the stacks were recorded with --threads (their first frame names the thread),
    summarised per thread, busiest first."""
    groups: dict = defaultdict(lambda: (Counter(), Counter(), [0]))
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            frames, n = stack.split(";"), int(n)
            key = frames.pop(0) if threads and len(frames) > 1 else "all threads"
            inclusive, own, total = groups[key]
            total[0] += n
            for name in {fr.split(":")[0] for fr in frames}:
                inclusive[name] += n
            own[frames[-1]] += n
    out = []
    for key, (inclusive, own, total) in sorted(groups.items(), key=lambda kv: -kv[1][2][0]):
        share = lambda c: [f"{v / max(total[0], 1):6.1%}  {k}" for k, v in c.most_common(top)]  # noqa: E731
        out += [f"## {key}: {total[0]} samples; on the stack:", *share(inclusive), "",
                "where the samples ended (function (file:line)):", *share(own)[:20], ""]
    return "\n".join(out)


def start_spies(pids: dict, seconds: int, raw_path) -> dict:
    """py-spy (raw stacks, every thread, idle samples kept, --nonblocking: not pausing the process it times) of each
    named process that has a pid, for `seconds` from now: name -> (the py-spy process, its raw file,
    `raw_path(name)`)."""
    import subprocess

    return {who: (subprocess.Popen(["py-spy", "record", "--nonblocking", "--threads", "--idle", "-p", str(pid), "-d",
                                    str(seconds), "-r", "200", "-f", "raw", "-o", raw],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
            for who, pid in pids.items() if pid is not None for raw in [raw_path(who)]}


def scheduler_pid() -> int | None:
    """SGLang's (first) scheduler process: it names itself sglang::scheduler*."""
    import psutil  # installed with SGLang

    for proc in psutil.process_iter(["cmdline"]):
        if any("sglang::scheduler" in part for part in proc.info["cmdline"] or ()):
            return proc.pid
    return None


def cpu_s(pid: int) -> float:
    """CPU seconds used so far by the server's front process (Aurora's, or plain SGLang's HTTP process)."""
    import psutil  # installed with SGLang

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def rate(url: str, concurrency: int, a, route: str, model: str | None = None, pid: int | None = None,
               spy: str | None = None, spy_pid: int | None = None) -> tuple:
    """(served tokens/s, CPU cores the process `pid` used meanwhile): `--rate-s` seconds after `--settle`,
    requests of `--rate-tokens` (every request runs to its length: ignore_eos) on `route` (see load). `spy`: the
    spy_summary of a py-spy record of `spy_pid` (default `pid`) over the window is written there; of another
    process than `pid`, with every thread apart and idle samples kept."""
    stop = asyncio.Event()
    loader = asyncio.create_task(load(url, concurrency, a.prompt_len, a.rate_tokens, stop, route, model,
                                       "n-" if a.uncaptured else "c-"))
    await asyncio.sleep(a.settle)
    t0, c0 = time.perf_counter(), cpu_s(pid) if pid else 0.0
    spying = None
    threads = spy_pid is not None and spy_pid != pid
    if spy is not None:
        # --nonblocking: py-spy's default pauses the process at every sample, which slows the process it times
        extra = ["--threads", "--idle"] if threads else []
        spying = await asyncio.create_subprocess_exec("py-spy", "record", "--nonblocking", *extra, "-p",
                                                      str(spy_pid or pid), "-d", str(int(a.rate_s)), "-r", "200",
                                                      "-f", "raw", "-o", spy + ".raw",
                                                      stdout=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(a.rate_s)
    if spying is not None:
        await spying.wait()
        with open(spy, "w") as f:
            f.write(spy_summary(spy + ".raw", threads=threads))
        # the raw stacks stay beside the summary: another cut of them needs no new run
    t1, c1 = time.perf_counter(), cpu_s(pid) if pid else 0.0
    stop.set()
    done = await loader
    return sum(t0 <= t < t1 for t in done) * a.rate_tokens / (t1 - t0), (c1 - c0) / (t1 - t0)


async def profile_once(url: str, concurrency: int, a, out_dir: str, stack: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stop = asyncio.Event()
    loader = asyncio.create_task(load(url, concurrency, a.prompt_len, a.max_tokens, stop,
                                       rid_prefix="n-" if a.uncaptured else "c-"))
    await asyncio.sleep(a.settle)
    async with httpx.AsyncClient(base_url=url, timeout=600) as h:
        r = await h.post("/start_profile", json={"output_dir": out_dir, "num_steps": a.steps,
                                                 "activities": ["CPU", "GPU"], "with_stack": stack,
                                                 "record_shapes": False})
        if r.status_code != 200:
            raise RuntimeError(f"/start_profile: {r.status_code} {r.text[:300]}")
    trace = None
    for _ in range(600):  # SGLang writes the trace when the steps are done
        files = glob.glob(os.path.join(out_dir, "**", "*.trace.json*"), recursive=True)
        if files:
            size = os.path.getsize(files[0])
            await asyncio.sleep(2)
            if os.path.getsize(files[0]) == size:
                trace = files[0]
                break
        await asyncio.sleep(1)
    stop.set()
    await loader
    if trace is None:
        raise RuntimeError(f"no trace in {out_dir}")
    return trace


def _union(intervals: list) -> float:
    total, end = 0.0, -1.0
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarise(trace: str, steps: int) -> dict:
    opener = gzip.open if trace.endswith(".gz") else open
    with opener(trace, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    per_tid = Counter(e["tid"] for e in events if e.get("cat") == "cpu_op")
    main = per_tid.most_common(1)[0][0]  # the scheduler thread launches nearly every op
    host = [e for e in events if e.get("tid") == main]
    t0, t1 = min(e["ts"] for e in host), max(e["ts"] + e["dur"] for e in host)
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATS]
    kernels = defaultdict(float)  # GPU time per kernel (or copy) name: what the GPU busy time is made of
    for e in events:
        if e.get("cat") in GPU_CATS:
            kernels[e["name"][:120]] += e["dur"]
    launches = Counter(e["name"] for e in host if e.get("cat") in ("cuda_runtime", "cuda_driver")
                       and e["name"] in LAUNCHES)
    annotations, python = defaultdict(float), defaultdict(float)
    for e in host:
        if e.get("cat") == "user_annotation" and not e["name"].startswith("ProfilerStep"):
            annotations[e["name"]] += e["dur"]
        elif e.get("cat") == "python_function":
            python[e["name"]] += e["dur"]
    ms = lambda us: round(us / 1000 / steps, 4)  # noqa: E731 (per round, in ms)
    return {"round_ms": ms(t1 - t0), "gpu_busy_ms": ms(_union(gpu)),
            "launches_per_round": {k: round(v / steps, 1) for k, v in launches.most_common()},
            "annotations_ms": {k: ms(v) for k, v in sorted(annotations.items(), key=lambda kv: -kv[1])[:20]},
            "kernels_ms": {k: ms(v) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:40]},
            "python_ms": {k: ms(v) for k, v in sorted(python.items(), key=lambda kv: -kv[1])[:60]}}


def stages(summary: dict) -> dict:
    """A round's host time (ms) split by SGLang's own spans: `scheduling` (the round outside run_batch: choosing
    the batch, processing the previous batch's results, receiving requests), `draft` (the draft's steps),
    `draft_extend` (the draft's forward over the accepted tokens), `verify` (the rest of run_batch: the target's
    verify forward, or a plain round's decode forward, with its preparation, sampling and Aurora's capture hooks).
    Host time of the scheduler thread: a wait on the GPU counts where the thread waits (with the overlap scheduler,
    often in result processing); where GPU busy < round, the host sets the pace."""
    ann = summary["annotations_ms"]
    run_batch = ann.get("scheduler.run_batch", 0.0)
    draft, extend = ann.get("draft", 0.0), ann.get("draft_extend", 0.0)
    return {"round": summary["round_ms"], "scheduling": summary["round_ms"] - run_batch, "draft": draft,
            "draft_extend": extend, "verify": run_batch - draft - extend, "gpu_busy": summary["gpu_busy_ms"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", action="append", default=[], help="NAME=ARGS, as in speedup_run.py")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--settle", type=float, default=6.0, help="seconds of load before profiling")
    p.add_argument("--rate-s", type=float, default=0.0, help="also time served tokens/s for this long per concurrency")
    p.add_argument("--rate-tokens", type=int, default=128)
    p.add_argument("--rate-only", action="store_true", help="time tokens/s only, no profile")
    p.add_argument("--routes", default="openai,generate,generate_stream", help="the routes --rate-s times")
    p.add_argument("--spy", action="store_true", help="py-spy the front process during the OpenAI-route timing")
    p.add_argument("--spy-scheduler", action="store_true",
                   help="py-spy SGLang's scheduler process during the /generate timing")
    p.add_argument("--stack", action="store_true", help="also a profile with the Python tracer on")
    p.add_argument("--uncaptured", action="store_true", help="/generate requests that Aurora's plugin does not "
                   "capture (rid n-...; default c-...: every request captured, as a sample rate of 1)")
    p.add_argument("--keep-traces", action="store_true", help="keep each profile's trace folder (<out>/<tag>/); "
                   "by default it is removed once summarised into profile.json")
    p.add_argument("--from-log", metavar="LOG", help="no run: rebuild <out>/profile.json from the summary lines a "
                   "run printed (its log), for a run whose profile.json was lost")
    p.add_argument("--out", default="results/sglang/profile")
    a = p.parse_args()
    if not a.mode and not a.from_log:
        p.error("give --mode NAME=ARGS (one or more) or --from-log LOG")
    os.makedirs(a.out, exist_ok=True)
    result = {}

    def write(result: dict) -> None:
        with open(os.path.join(a.out, "profile.json"), "w") as f:
            json.dump({"args": vars(a), "result": result}, f, indent=1)

    if a.from_log:
        with open(a.from_log, errors="replace") as f:
            result = from_log(f.read())
        write(result)
        print_table(result)
        return

    for spec in a.mode:
        name, _, args = spec.partition("=")
        port, log_path = free_port(), os.path.join(a.out, f"{name}_server.log")
        try:
            proc = start_server(args, port, log_path)
        except (RuntimeError, TimeoutError) as e:  # a mode that cannot start must not lose the others
            result[name] = {"error": repr(e)}
            print(f"{name}: FAILED to start: {e!r}", flush=True)
            write(result)
            continue
        try:
            url = sglang_url(args, port, log_path)
            for c in [int(x) for x in a.concurrency.split(",")]:
                if a.rate_s > 0:  # the OpenAI front users call (Aurora's, or plain SGLang's own), then /generate
                    front = f"http://127.0.0.1:{port}"
                    model = httpx.get(front + "/v1/models", timeout=10).json()["data"][0]["id"]
                    for route, u, m in (("openai", front, model), ("generate", url, None),
                                        ("generate_stream", url, None)):
                        if route not in a.routes.split(","):
                            continue
                        spy, spy_pid = None, None
                        if a.spy and route == "openai":
                            spy = os.path.join(a.out, f"spy_{name}_c{c}.txt")
                        elif a.spy_scheduler and route == "generate":
                            spy, spy_pid = os.path.join(a.out, f"spy_sched_{name}_c{c}.txt"), scheduler_pid()
                            if spy_pid is None:
                                raise RuntimeError("--spy-scheduler: no sglang::scheduler process found")
                        tps, cores = asyncio.run(rate(u, c, a, route, m, proc.pid, spy, spy_pid))
                        result[f"{name}_c{c}_{route}"] = {"tok_s": tps, "front_cpu_cores": cores}
                        print(f"{name}_c{c}: {tps:.0f} tok/s at {route} ({a.rate_tokens} tokens), front process "
                              f"{cores:.2f} cores", flush=True)
                for stack in () if a.rate_only else (False, True) if a.stack else (False,):
                    tag = f"{name}_c{c}" + ("_stack" if stack else "")
                    trace = asyncio.run(profile_once(url, c, a, os.path.join(a.out, tag), stack))
                    result[tag] = s = summarise(trace, a.steps)
                    if not a.keep_traces:
                        shutil.rmtree(os.path.join(a.out, tag), ignore_errors=True)
                    write(result)  # each profile as it lands: a run cut short keeps what it measured
                    print(summary_line(tag, s), flush=True)
        finally:
            stop_server(proc)
        write(result)
    print_table(result)


def summary_line(tag: str, s: dict) -> str:
    """One profile as the run prints it (two lines); from_log reads them back."""
    return (f"{tag:24s} round {s['round_ms']:.3f} ms  gpu busy {s['gpu_busy_ms']:.3f} ms  "
            f"launches {sum(s['launches_per_round'].values()):.0f}  {s['annotations_ms']}\n  kernels "
            f"{dict(list(s['kernels_ms'].items())[:6])}")


def from_log(text: str) -> dict:
    """The summaries a run printed ("<tag> round R ms  gpu busy G ms  launches N  {spans}" and "  kernels {...}"),
    as profile.json holds them: round, GPU busy, the annotation spans and the top kernels as printed; launches as
    their total (the log does not split them by kind); a failed mode's error."""
    out = {}
    for m in re.finditer(r"^(\S+)\s+round ([\d.]+) ms  gpu busy ([\d.]+) ms  launches (\d+)  (\{.*\})\n"
                         r"  kernels (\{.*\})$", text, re.M):
        tag, round_ms, busy, launches, spans, kernels = m.groups()
        out[tag] = {"round_ms": float(round_ms), "gpu_busy_ms": float(busy),
                    "launches_per_round": {"all": float(launches)}, "annotations_ms": ast.literal_eval(spans),
                    "kernels_ms": ast.literal_eval(kernels), "python_ms": {}, "from_log": True}
    for m in re.finditer(r"^(\S+): FAILED to start: (.*)$", text, re.M):
        out[m.group(1)] = {"error": m.group(2)}
    if not out:
        raise SystemExit("no profile summary lines in that log")
    return out


def print_table(result: dict) -> None:
    print("\n| mode | round ms | GPU busy ms | launches / round | scheduling | draft | verify and the rest of the "
          "batch | draft extend |\n|---|---|---|---|---|---|---|---|")
    for tag, s in result.items():
        if "error" in s:
            print(f"| {tag} | failed: {s['error'][:100]} |")
        if "round_ms" not in s:
            continue
        p = stages(s)
        print(f"| {tag} | {s['round_ms']:.3f} | {s['gpu_busy_ms']:.3f} | {sum(s['launches_per_round'].values()):.0f} | "
              f"{p['scheduling']:.3f} | {p['draft']:.3f} | {p['verify']:.3f} | {p['draft_extend']:.3f} |")


if __name__ == "__main__":
    main()
