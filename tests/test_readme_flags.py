"""Every `--flag` README.md shows exists in the command it is shown with: `aurora serve` / `aurora report`
(parsed from their `--help`), or a script of scripts/ (its argparse flags, read from its source without
running it). A flag shown alone (`--draft none` in a sentence) must exist in `aurora serve` or in a script.
Lines of other programs (pip, uv, SGLang's own server, pytest, docker) are not checked, nor the SGLang flags
passed verbatim through `--sglang-args "..."`. README.md is read when the test runs."""
import ast
import os
import re

import pytest

from aurora.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SCRIPT = re.compile(r"scripts/(\w+)\.py")
# programs that are not the project's: their lines are not checked
OTHERS = r"pip|pip3|uv|py-spy|pytest|docker|curl|git|nvidia-smi|wandb|python3? -m (sglang|pytest|venv|pip)"
# flags of those programs that the README may name alone in a sentence (SGLang's server, pip)
FOREIGN = {"--no-deps", "--speculative-algorithm", "--speculative-draft-model-path", "--custom-weight-loader",
           "--attention-backend", "--sampling-backend", "--mem-fraction-static", "--speculative-adaptive"}


def help_flags(*argv: str, capsys) -> set[str]:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return set(FLAG.findall(capsys.readouterr().out))


def script_flags(name: str) -> set[str]:
    """The option strings of the script's add_argument calls."""
    tree = ast.parse(open(os.path.join(ROOT, "scripts", f"{name}.py")).read())
    return {a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}


def segments(readme: str) -> list[tuple[str, bool]]:
    """(text, is_prose): each command of the code blocks' shell lines (continuations joined, split at
    `&&`, `;` and pipes), each inline code span, each line of prose."""
    out = []
    for i, part in enumerate(re.split(r"^```[^\n]*\n", readme, flags=re.M)):
        if i % 2:  # inside a fence
            out += [(c, False) for line in part.replace("\\\n", " ").splitlines()
                    for c in re.split(r"&&|;|\|", line)]
        else:
            out += [(c, False) for c in re.findall(r"`([^`\n]+)`", part)]
            out += [(line, True) for line in re.sub(r"`[^`\n]+`", " ", part).splitlines()]
    return out


def owner(segment: str) -> tuple[str | None, str]:
    """(command, the part of the segment that holds its flags); command None: not one of the project's."""
    # flags passed on inside a quoted value (to SGLang, or to the `aurora serve` a benchmark starts) are not the command's
    segment = re.sub(r"""(--sglang-args|--serve-args)(\s+|=)(["']).*?\3""", r"\1 X", segment)
    # a benchmark's --mode NAME="ARGS": ARGS are `aurora serve` flags (or plain SGLang's, after @sglang), not its own
    segment = re.sub(r"""(--mode)(\s+|=)(\w+=)?(["']).*?\4""", r"\1 X", segment)
    segment = re.sub(r"""^\s*(\w+=("[^"]*"|'[^']*'|\S*)\s+)+""", "", segment)  # VAR=value before a command
    m = SCRIPT.search(segment)
    if m:
        return f"scripts/{m.group(1)}.py", segment[m.end():]
    m = re.search(r"aurora (serve|report)\b", segment)
    if m:
        return f"aurora {m.group(1)}", segment[m.end():]
    if re.match(rf"\s*(\S*/)?({OTHERS})\b", segment):
        return None, ""
    return "any", segment


def test_every_flag_in_the_readme_exists(capsys):
    readme = open(os.path.join(ROOT, "README.md")).read()
    serve, report = help_flags("serve", capsys=capsys), help_flags("report", capsys=capsys)
    scripts = {f"scripts/{f[:-3]}.py": script_flags(f[:-3]) for f in os.listdir(os.path.join(ROOT, "scripts"))
               if f.endswith(".py")}
    assert "--sync-every" in serve and "--draft-vocab-size" in serve and "--out" in report
    known = {"aurora serve": serve, "aurora report": report, **scripts}
    known["any"] = serve.union(*scripts.values())
    missing, checked = [], 0
    for seg, prose in segments(readme):
        command, text = ("any", seg) if prose else owner(seg)
        if command is None:
            continue
        if command not in known:
            missing.append(f"{command} (no such script)")
            continue
        for flag in FLAG.findall(text):
            checked += 1
            if flag not in known[command] and not (command == "any" and flag in FOREIGN):
                missing.append(f"{command} {flag}   in: {seg.strip()[:120]}")
    assert not missing, "README.md shows flags that do not exist:\n" + "\n".join(missing)
    assert checked > 0 or "--" not in readme
