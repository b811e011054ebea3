#!/usr/bin/env python3
"""Checks of the batch state machine's definition, without Terraform or AWS.

Run by scripts/check-infra.sh with python-hcl2 and statelint (with
jsonata-python) on PYTHONPATH:

  python3 scripts/check_state_machine.py infra/terraform

1. Evaluates `local.batch_definition` (infra/terraform/stepfunctions.tf) from
   the parsed HCL: locals, variable defaults, string templates and join();
   resource attributes become placeholder ARNs.
2. Checks its shape: every Next, Default, Choices[].Next and Catch[].Next
   names a state of the same scope, every state is reachable, each state ends
   or goes on as its type requires, recursively into Map ItemProcessors.
3. Runs statelint (the Amazon States Language validator) over it.
4. Runs it: a small interpreter of the states and fields the definition uses
   (Choice, Task, Map, Pass, Succeed, Fail; Assign, Output, Retry, Catch,
   ItemReader, ItemSelector, ResultWriter) evaluates its JSONata with
   jsonata-python against scripted batch-function answers: the hourly run,
   a reprocess, nothing to do, a Conflict and a replan, too many conflicts,
   a failed part, a failed publish, a failed compaction, the serving store's
   load (a refill over several loads, the cap on loads, a load that fails on
   every path), and bad inputs.

Exits non-zero on the first kind of problem found, after printing them all.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any, Callable

import hcl2

# --------------------------------------------------------------------------
# 1. HCL evaluation (the subset stepfunctions.tf and its references use)
# --------------------------------------------------------------------------

MOCK_DATA = {
    "aws_caller_identity": {"current": {"account_id": "123456789012"}},
    "aws_partition": {"current": {"partition": "aws"}},
}


class Mock:
    """A resource attribute: only its path matters, as a placeholder ARN."""

    def __init__(self, path: list[str]):
        self.path = path

    def __str__(self) -> str:
        return "arn:aws:mock:us-east-1:123456789012:" + ".".join(self.path)


class Namespace:
    def __init__(self, get: Callable[[str], Any]):
        self.get = get


class HclEval:
    def __init__(self, tf_dir: pathlib.Path):
        self.locals_raw: dict[str, Any] = {}
        self.var_defaults: dict[str, Any] = {}
        for path in sorted(tf_dir.glob("*.tf")):
            with path.open(encoding="utf-8") as fh:
                doc = hcl2.load(fh)
            for block in doc.get("locals", []):
                for k, v in block.items():
                    if not k.startswith("__"):
                        self.locals_raw[k] = v
            for block in doc.get("variable", []):
                for name, body in block.items():
                    if not name.startswith("__") and "default" in body:
                        self.var_defaults[_unquote(name)] = body["default"]
        self.locals_done: dict[str, Any] = {}
        self.vars_done: dict[str, Any] = {}

    def local(self, name: str) -> Any:
        if name not in self.locals_done:
            if name not in self.locals_raw:
                raise KeyError(f"local.{name} is not defined")
            self.locals_done[name] = self.value(self.locals_raw[name])
        return self.locals_done[name]

    def var(self, name: str) -> Any:
        if name not in self.vars_done:
            if name not in self.var_defaults:
                raise KeyError(f"var.{name} has no default")
            self.vars_done[name] = self.value(self.var_defaults[name])
        return self.vars_done[name]

    def value(self, v: Any) -> Any:
        if isinstance(v, dict):
            return {_unquote(k): self.value(x) for k, x in v.items() if not k.startswith("__")}
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, str):
            p = _Parser(v, self)
            out = p.expression() if v.startswith('"') else p.template(end=None)
            p.skip_ws()
            if not p.eof():
                raise ValueError(f"cannot evaluate {v!r}: stopped at {p.i}")
            return _plain(out)
        return v


def _unquote(k: str) -> str:
    return k[1:-1] if len(k) >= 2 and k[0] == k[-1] == '"' else k


def _plain(v: Any) -> Any:
    if isinstance(v, Mock):
        return str(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
_FUNCTIONS = {
    "join": lambda sep, items: sep.join(str(_plain(x)) for x in items),
    "tostring": lambda x: str(_plain(x)),
    "concat": lambda *lists: [x for lst in lists for x in lst],
}


class _Parser:
    def __init__(self, s: str, ev: HclEval):
        self.s, self.i, self.ev = s, 0, ev

    def eof(self) -> bool:
        return self.i >= len(self.s)

    def peek(self, n: int = 1) -> str:
        return self.s[self.i : self.i + n]

    def skip_ws(self) -> None:
        while not self.eof() and self.s[self.i] in " \t\r\n":
            self.i += 1

    def expect(self, tok: str) -> None:
        self.skip_ws()
        if self.peek(len(tok)) != tok:
            raise ValueError(f"expected {tok!r} at {self.i} in {self.s!r}")
        self.i += len(tok)

    # template content up to `end` (a closing quote) or the end of the text
    def template(self, end: str | None) -> Any:
        parts: list[Any] = []
        lit = ""
        while True:
            if self.eof():
                if end is not None:
                    raise ValueError(f"unterminated string in {self.s!r}")
                break
            c = self.s[self.i]
            if end is not None and c == end:
                self.i += 1
                break
            if c == "\\" and end is not None:
                nxt = self.s[self.i + 1]
                if nxt in _ESCAPES:
                    lit += _ESCAPES[nxt]
                    self.i += 2
                elif nxt == "u":
                    lit += chr(int(self.s[self.i + 2 : self.i + 6], 16))
                    self.i += 6
                else:
                    raise ValueError(f"unknown escape \\{nxt} in {self.s!r}")
            elif self.peek(3) in ("$${", "%%{"):
                lit += self.peek(3)[1:]
                self.i += 3
            elif self.peek(2) == "${":
                self.i += 2
                if lit:
                    parts.append(lit)
                    lit = ""
                parts.append(self.expression())
                self.expect("}")
            elif self.peek(2) == "%{":
                raise ValueError(f"template directives are not supported: {self.s!r}")
            else:
                lit += c
                self.i += 1
        if lit:
            parts.append(lit)
        if len(parts) == 1 and not isinstance(parts[0], str):
            return parts[0]  # a lone interpolation keeps its type
        return "".join(str(_plain(p)) for p in parts)

    def expression(self) -> Any:
        v = self.term()
        while True:
            self.skip_ws()
            op = self.peek()
            if op in ("+", "-") and self.peek(2) not in ("->",):
                self.i += 1
                r = self.term()
                v = v + r if op == "+" else v - r
            else:
                return v

    def term(self) -> Any:
        v = self.postfix()
        while True:
            self.skip_ws()
            op = self.peek()
            if op in ("*", "/", "%"):
                self.i += 1
                r = self.postfix()
                v = v * r if op == "*" else (v / r if op == "/" else v % r)
            else:
                return v

    def postfix(self) -> Any:
        v = self.primary()
        while True:
            if self.peek() == "." and re.match(r"[A-Za-z_]", self.s[self.i + 1 : self.i + 2]):
                self.i += 1
                v = _get(v, self.identifier())
            elif self.peek() == "[":
                self.i += 1
                key = self.expression()
                self.expect("]")
                v = _get(v, key)
            else:
                return v

    def identifier(self) -> str:
        m = re.match(r"[A-Za-z_][A-Za-z0-9_-]*", self.s[self.i :])
        if not m:
            raise ValueError(f"identifier expected at {self.i} in {self.s!r}")
        self.i += len(m.group(0))
        return m.group(0)

    def primary(self) -> Any:
        self.skip_ws()
        c = self.peek()
        if c == "(":
            self.i += 1
            v = self.expression()
            self.expect(")")
            return v
        if c == '"':
            self.i += 1
            return self.template(end='"')
        if c == "[":
            self.i += 1
            items = []
            while True:
                self.skip_ws()
                if self.peek() == "]":
                    self.i += 1
                    return items
                items.append(self.expression())
                self.skip_ws()
                if self.peek() == ",":
                    self.i += 1
        m = re.match(r"-?[0-9]+(\.[0-9]+)?", self.s[self.i :])
        if m:
            self.i += len(m.group(0))
            return float(m.group(0)) if m.group(1) else int(m.group(0))
        name = self.identifier()
        if name in ("true", "false"):
            return name == "true"
        if name == "null":
            return None
        self.skip_ws()
        if self.peek() == "(":
            self.i += 1
            args = []
            while True:
                self.skip_ws()
                if self.peek() == ")":
                    self.i += 1
                    break
                args.append(self.expression())
                self.skip_ws()
                if self.peek() == ",":
                    self.i += 1
            if name not in _FUNCTIONS:
                raise ValueError(f"function {name}() is not supported here")
            return _FUNCTIONS[name](*args)
        if name == "local":
            return Namespace(self.ev.local)
        if name == "var":
            return Namespace(self.ev.var)
        if name == "data":
            return MOCK_DATA
        return Mock([name])


def _get(obj: Any, key: Any) -> Any:
    if isinstance(obj, Namespace):
        return obj.get(key)
    if isinstance(obj, Mock):
        return Mock(obj.path + [str(key)])
    if isinstance(obj, dict):
        return obj[key]
    if isinstance(obj, list):
        return obj[int(key)]
    raise TypeError(f"cannot index {obj!r} with {key!r}")


# --------------------------------------------------------------------------
# 2. shape
# --------------------------------------------------------------------------


def check_shape(scope: dict[str, Any], where: str, problems: list[str]) -> int:
    states = scope.get("States")
    if not isinstance(states, dict) or not states:
        problems.append(f"{where}: no States")
        return 0
    start = scope.get("StartAt")
    if start not in states:
        problems.append(f"{where}: StartAt {start!r} is not a state")
    count = 0
    edges: dict[str, list[str]] = {}
    for name, st in states.items():
        count += 1
        at = f"{where}/{name}"
        kind = st.get("Type")
        targets: list[str] = []
        if "Next" in st:
            targets.append(st["Next"])
        if kind == "Choice":
            targets += [r.get("Next") for r in st.get("Choices", [])]
            if "Default" in st:
                targets.append(st["Default"])
            if "End" in st or "Next" in st:
                problems.append(f"{at}: a Choice has neither End nor Next")
        elif kind in ("Succeed", "Fail"):
            if "Next" in st or "End" in st:
                problems.append(f"{at}: a {kind} state has neither Next nor End")
        elif kind in ("Task", "Map", "Pass", "Wait", "Parallel"):
            if ("Next" in st) == bool(st.get("End")):
                problems.append(f"{at}: needs exactly one of Next and End: true")
        else:
            problems.append(f"{at}: unknown Type {kind!r}")
        targets += [c.get("Next") for c in st.get("Catch", [])]
        for t in targets:
            if t not in states:
                problems.append(f"{at}: goes to {t!r}, which is not a state of {where}")
        edges[name] = [t for t in targets if t in states]
        if kind == "Map":
            proc = st.get("ItemProcessor")
            if not isinstance(proc, dict):
                problems.append(f"{at}: a Map needs an ItemProcessor")
            else:
                count += check_shape(proc, at, problems)
    seen, todo = set(), [start] if start in states else []
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += edges[n]
    for name in states:
        if name not in seen:
            problems.append(f"{where}/{name}: unreachable from {start!r}")
    return count


# --------------------------------------------------------------------------
# 4. a small interpreter, enough for this definition
# --------------------------------------------------------------------------


class StepError(Exception):
    def __init__(self, error: str, cause: str = ""):
        super().__init__(f"{error}: {cause}")
        self.error, self.cause = error, cause


def jsonata(text: str, states: dict[str, Any], variables: dict[str, Any]) -> Any:
    from jsonata import Jsonata  # jsonata-python, installed with statelint
    from jsonata.utils import Utils

    expr = Jsonata(text)
    expr.assign("states", states)
    for k, v in variables.items():
        # a variable assigned null is JSON null (kept in an object), while
        # jsonata-python takes a bound None for undefined (dropped)
        expr.assign(k, Utils.NULL_VALUE if v is None else v)
    try:
        return expr.evaluate(None)
    except Exception as exc:  # Step Functions' States.QueryEvaluationError
        raise StepError("States.QueryEvaluationError", f"{text}: {exc}") from exc


def resolve(template: Any, states: dict[str, Any], variables: dict[str, Any]) -> Any:
    if isinstance(template, str):
        m = re.fullmatch(r"\{%(.*)%\}", template, re.S)
        return jsonata(m.group(1).strip(), states, variables) if m else template
    if isinstance(template, dict):
        return {k: resolve(v, states, variables) for k, v in template.items()}
    if isinstance(template, list):
        return [resolve(v, states, variables) for v in template]
    return template


def assign(spec: dict[str, Any] | None, states: dict[str, Any], variables: dict[str, Any]) -> None:
    # every value is evaluated with the variables as they were before the state
    if spec:
        variables.update(resolve(spec, states, dict(variables)))


def matches(error: str, names: list[str]) -> bool:
    return error in names or "States.ALL" in names or (
        "States.TaskFailed" in names and not error.startswith("States.")
    )


class World:
    """The batch function and S3 as scripted by a scenario."""

    def __init__(self, answer: Callable[[dict[str, Any], "World"], Any], items: Callable[[str], list]):
        self.answer, self.items, self.calls = answer, items, []

    def invoke(self, payload: dict[str, Any]) -> Any:
        self.calls.append(payload)
        return self.answer(payload, self)

    def steps(self, step: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c.get("step") == step]


def run_machine(scope: dict[str, Any], input_: Any, world: World, variables: dict[str, Any]) -> tuple[str, Any]:
    """Runs one scope (the machine or a map's child); ('SUCCEEDED', output) or
    ('FAILED', StepError)."""
    name, state_input = scope["StartAt"], input_
    for _ in range(500):
        st = scope["States"][name]
        kind = st["Type"]
        ctx: dict[str, Any] = {"input": state_input, "context": {}}
        try:
            if kind == "Choice":
                nxt = None
                for rule in st["Choices"]:
                    if resolve(rule["Condition"], ctx, variables) is True:
                        assign(rule.get("Assign"), ctx, variables)
                        nxt = rule["Next"]
                        break
                if nxt is None:
                    if "Default" not in st:
                        raise StepError("States.NoChoiceMatched", name)
                    assign(st.get("Assign"), ctx, variables)
                    nxt = st["Default"]
                name = nxt
                continue
            if kind == "Succeed":
                return "SUCCEEDED", resolve(st["Output"], ctx, variables) if "Output" in st else state_input
            if kind == "Fail":
                return "FAILED", StepError(
                    resolve(st.get("Error", ""), ctx, variables), resolve(st.get("Cause", ""), ctx, variables)
                )
            if kind == "Pass":
                result = state_input
            elif kind == "Task":
                result = run_task(st, ctx, world, variables)
            elif kind == "Map":
                result = run_map(st, ctx, world, variables)
            else:
                raise StepError("States.Runtime", f"{kind} is not simulated")
        except StepError as err:
            catcher = next((c for c in st.get("Catch", []) if matches(err.error, c["ErrorEquals"])), None)
            if catcher is None:
                return "FAILED", err
            ctx["errorOutput"] = {"Error": err.error, "Cause": err.cause}
            assign(catcher.get("Assign"), ctx, variables)
            state_input = resolve(catcher["Output"], ctx, variables) if "Output" in catcher else ctx["errorOutput"]
            name = catcher["Next"]
            continue
        ctx["result"] = result
        assign(st.get("Assign"), ctx, variables)
        output = resolve(st["Output"], ctx, variables) if "Output" in st else result
        if st.get("End"):
            return "SUCCEEDED", output
        name, state_input = st["Next"], output
    raise RuntimeError("more than 500 transitions: a loop")


def run_task(st: dict[str, Any], ctx: dict[str, Any], world: World, variables: dict[str, Any]) -> Any:
    if not st["Resource"].endswith(":states:::lambda:invoke"):
        raise StepError("States.Runtime", f"resource {st['Resource']} is not simulated")
    args = resolve(st["Arguments"], ctx, variables)
    attempts: dict[int, int] = {}
    while True:
        try:
            return {"Payload": world.invoke(args["Payload"]), "StatusCode": 200}
        except StepError as err:
            retriers = st.get("Retry", [])
            idx = next((i for i, r in enumerate(retriers) if matches(err.error, r["ErrorEquals"])), None)
            if idx is None or attempts.get(idx, 0) >= retriers[idx].get("MaxAttempts", 3):
                raise
            attempts[idx] = attempts.get(idx, 0) + 1


def run_map(st: dict[str, Any], ctx: dict[str, Any], world: World, variables: dict[str, Any]) -> Any:
    if "ItemReader" in st:
        reader = st["ItemReader"]
        if not (reader["Resource"].endswith(":states:::s3:getObject") and reader["ReaderConfig"]["InputType"] == "JSON"):
            raise StepError("States.Runtime", "only a JSON array from s3:getObject is simulated")
        where = resolve(reader["Arguments"], ctx, variables)
        items = world.items(f"s3://{where['Bucket']}/{where['Key']}")
    else:
        items = resolve(st["Items"], ctx, variables)
    if not isinstance(items, list):
        raise StepError("States.Runtime", f"Items is not an array: {items!r}")
    results, failed = [], 0
    for index, value in enumerate(items):
        item_ctx = {"input": ctx["input"], "context": {"Map": {"Item": {"Index": index, "Value": value}}}}
        child_input = resolve(st["ItemSelector"], item_ctx, variables) if "ItemSelector" in st else value
        # a distributed Map's child execution sees none of the parent's variables
        status, out = run_machine(st["ItemProcessor"], json.loads(json.dumps(child_input)), world, {})
        if status == "SUCCEEDED":
            results.append(out)
        else:
            failed += 1
    if items and 100 * failed / len(items) > st.get("ToleratedFailurePercentage", 0):
        raise StepError("States.ExceedToleratedFailureThreshold", f"{failed} of {len(items)} items failed")
    if "ResultWriter" in st:
        where = resolve(st["ResultWriter"]["Arguments"], ctx, variables)
        return {
            "MapRunArn": "arn:aws:states:us-east-1:123456789012:mapRun:tally-batch/Parts:0",
            "ResultWriterDetails": {"Bucket": where["Bucket"], "Key": f"{where['Prefix']}/0/manifest.json"},
        }
    return results


# --------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------

LAKE_BUCKET = "tally-lake"


def batch_function(
    *,
    items_per_plan: int = 3,
    day_items: int = 2,
    left_uncompacted: tuple[str, ...] = (),
    days: tuple[str, ...] = ("2026-11-24",),
    conflicts: int = 0,
    part_fails: bool = False,
    publish_fails: bool = False,
    compact_fails: tuple[str, ...] = (),
    load_complete: tuple[bool, ...] = (True,),
    load_errors: tuple[str | None, ...] = (),
) -> Callable[[dict[str, Any], World], Any]:
    """The batch function's answers. The n-th load (from 1) raises
    load_errors[n-1] when that is set (the last entry stands for every later
    load), else answers a report whose `complete` is load_complete[n-1] (the
    last entry likewise)."""
    state = {"plans": 0, "publishes": 0, "loads": 0}

    def answer(p: dict[str, Any], world: World) -> Any:
        step = p.get("step")
        if step == "plan":
            state["plans"] += 1
            run_id = f"run-{state['plans']}"
            hours = items_per_plan
            day_count = day_items if items_per_plan else 0
            return {
                "run_id": run_id,
                "hour_items": {"bucket": LAKE_BUCKET, "key": f"lake/_staging/{run_id}/hour_items.json"},
                "hour_item_count": hours,
                "day_items": {"bucket": LAKE_BUCKET, "key": f"lake/_staging/{run_id}/day_items.json"},
                "day_item_count": day_count,
                "item_count": hours + day_count,
                **({"compact_days": list(left_uncompacted)} if hours == 0 else {}),
            }
        if step == "part":
            if part_fails and p["item"] == 1:
                raise StepError("Lambda.Unknown", "out of memory")
            return {"run_id": p["run_id"], "item": p["item"], "rows": 10}
        if step == "publish":
            state["publishes"] += 1
            if state["publishes"] <= conflicts:
                raise StepError("Conflict", '{"errorType":"Conflict","errorMessage":"another run published"}')
            if publish_fails:
                raise StepError("Lambda.Unknown", "timed out")
            return {"hours": 2, "days": len(days), "hourly_rows": 5, "daily_rows": 3, "raw_version": 7,
                    "watermark": "2026-11-24T10:00:00Z", "compact_days": list(days)}
        if step == "compact":
            if p["day"] in compact_fails:
                raise StepError("States.TaskFailed", "compaction failed")
            return {"day": p["day"]}
        if step == "load":
            state["loads"] += 1
            n = state["loads"]
            error = load_errors[min(n, len(load_errors)) - 1] if load_errors else None
            if error:
                raise StepError(error, json.dumps({"errorType": error, "errorMessage": "redis: connection refused"}))
            return load_report(load_complete[min(n, len(load_complete)) - 1], n)
        raise StepError("BadPayload", json.dumps(p))

    return answer


def load_report(complete: bool, n: int = 1) -> dict[str, Any]:
    """What the load step answers (serving-layer's LoadReport)."""
    return {"published": True, "dates": [f"2026-11-{30 - n:02d}"], "values": 123, "bytes": 4567,
            "complete": complete, "hourly_version": 12, "daily_version": 7,
            "watermark": "2026-11-24T10:00:00Z", "dropped": 0, "seconds": 3.2}


LOAD = {"step": "load", "max_dates": 40}


def items_file(uri: str) -> list[dict[str, Any]]:
    # the hour items are 0..2, the day items 3..4 (the plan's two waves)
    m = re.fullmatch(rf"s3://{LAKE_BUCKET}/lake/_staging/(run-\d+)/(hour|day)_items\.json", uri)
    if not m:
        raise StepError("States.ItemReaderFailed", f"no such object {uri}")
    wave = range(3) if m.group(2) == "hour" else range(3, 5)
    return [{"step": "part", "run_id": m.group(1), "item": n} for n in wave]


def scenarios(defn: dict[str, Any]) -> tuple[int, list[str]]:
    problems: list[str] = []
    count = 0

    def case(label: str, input_: Any, answer, check: Callable[[str, Any, World], str | None]) -> None:
        nonlocal count
        count += 1
        world = World(answer, items_file)
        try:
            status, out = run_machine(defn, input_, world, {})
            why = check(status, out, world)
        except Exception as exc:  # an expression error is a finding, not a crash
            why = f"{type(exc).__name__}: {exc}"
        if why:
            problems.append(f"scenario {label}: {why}")

    hour = {"from": "2026-11-01T00:00:00Z", "to": "2026-11-01T06:00:00Z"}

    def hourly_ok(status, out, w):
        if status != "SUCCEEDED":
            return f"{status} {out}"
        if w.calls[0] != {"step": "plan"}:
            return f"plan payload {w.calls[0]}"
        if w.steps("part") != [{"step": "part", "run_id": "run-1", "item": n} for n in range(5)]:
            return f"part payloads (the hours' items, then the days') {w.steps('part')}"
        if w.steps("publish") != [{"step": "publish", "run_id": "run-1"}]:
            return f"publish payloads {w.steps('publish')}"
        if w.steps("compact") != [{"step": "compact", "day": "2026-11-24"}]:
            return f"compact payloads {w.steps('compact')}"
        if w.steps("load") != [LOAD]:
            return f"load payloads {w.steps('load')}"
        if [c["step"] for c in w.calls][-3:] != ["publish", "load", "compact"]:
            return f"load not between publish and compact: {[c['step'] for c in w.calls]}"
        if out.get("published", {}).get("watermark") != "2026-11-24T10:00:00Z" or out.get("compaction_failed") != []:
            return f"output {out}"
        if out.get("loads") != 1 or out.get("load") != load_report(True) or out.get("load_failed", "absent") is not None:
            return f"load in output {out}"
        if not str(out.get("hour_parts_map_run", "")).startswith("arn:"):
            return f"no map run in {out}"
        return None

    case("hourly", {}, batch_function(), hourly_ok)

    case("hours without a complete day", {}, batch_function(day_items=0, days=()),
         lambda s, o, w: None if s == "SUCCEEDED"
         and [c["item"] for c in w.steps("part")] == [0, 1, 2]
         and len(w.steps("publish")) == 1 and o.get("day_parts_map_run") is None
         else f"{s} {o} {w.calls}")

    case("reprocess", hour, batch_function(days=("2026-11-01", "2026-11-02")),
         lambda s, o, w: None if s == "SUCCEEDED" and w.calls[0] == {"step": "plan", **hour}
         and [c["day"] for c in w.steps("compact")] == ["2026-11-01", "2026-11-02"]
         else f"{s} {o} {w.calls}")

    case("nothing to compute, a day left uncompacted", {},
         batch_function(items_per_plan=0, left_uncompacted=("2026-11-23",)),
         lambda s, o, w: None if s == "SUCCEEDED" and [c["step"] for c in w.calls] == ["plan", "load", "compact"]
         and w.steps("compact") == [{"step": "compact", "day": "2026-11-23"}]
         and o["load"] == load_report(True) and o["load_failed"] is None
         and o["published"] == {"compact_days": ["2026-11-23"]} and o["compaction_failed"] == []
         else f"{s} {o} {w.calls}")

    # the hourly run with nothing to compute is what refills a Redis that lost
    # its data within the hour: it still loads, once
    case("nothing to do still loads once", {}, batch_function(items_per_plan=0),
         lambda s, o, w: None if s == "SUCCEEDED" and [c["step"] for c in w.calls] == ["plan", "load"]
         and w.steps("load") == [LOAD]
         and o == {"run_id": "run-1", "item_count": 0, "replans": 0, "loads": 1, "load": load_report(True),
                   "load_failed": None} else f"{s} {o} {w.calls}")

    case("one conflict, one replan", {}, batch_function(conflicts=1),
         lambda s, o, w: None if s == "SUCCEEDED" and len(w.steps("plan")) == 2 and len(w.steps("publish")) == 2
         and w.steps("publish")[1]["run_id"] == "run-2" and o["replans"] == 1 and o["run_id"] == "run-2"
         and len(w.steps("load")) == 1 and o["loads"] == 1
         else f"{s} {o} {[c['step'] for c in w.calls]}")

    case("too many conflicts", {}, batch_function(conflicts=99),
         lambda s, o, w: None if s == "FAILED" and o.error == "TooManyConflicts"
         and len(w.steps("plan")) == 4 and len(w.steps("publish")) == 4 and "3 replans" in o.cause
         and not w.steps("compact") and not w.steps("load") else f"{s} {o} {[c['step'] for c in w.calls]}")

    case("a part fails", {}, batch_function(part_fails=True),
         lambda s, o, w: None if s == "FAILED" and o.error == "States.ExceedToleratedFailureThreshold"
         and not w.steps("publish") and not w.steps("load") else f"{s} {o}")

    case("publish fails", {}, batch_function(publish_fails=True),
         lambda s, o, w: None if s == "FAILED" and o.error == "Lambda.Unknown" and len(w.steps("plan")) == 1
         and len(w.steps("publish")) == 4 and not w.steps("load") else f"{s} {o} {[c['step'] for c in w.calls]}")

    case("a compaction fails", hour, batch_function(days=("2026-11-01", "2026-11-02"), compact_fails=("2026-11-02",)),
         lambda s, o, w: None if s == "SUCCEEDED" and o["compaction_failed"] == ["2026-11-02"]
         and len(w.steps("compact")) == 3 and o["loads"] == 1
         else f"{s} {o} {[c.get('day') for c in w.steps('compact')]}")

    # --- the serving store's load ---

    def steps_of(w):
        return [c["step"] for c in w.calls if c["step"] != "part"]

    # a refill after Redis lost its data: more dates than one load takes
    case("a refill over 3 loads", {}, batch_function(load_complete=(False, False, True)),
         lambda s, o, w: None if s == "SUCCEEDED"
         and steps_of(w) == ["plan", "publish", "load", "load", "load", "compact"]
         and w.steps("load") == [LOAD] * 3
         and o["loads"] == 3 and o["load"] == load_report(True, 3) and o["load_failed"] is None
         and o["compaction_failed"] == [] else f"{s} {o} {steps_of(w)}")

    case("a refill over 3 loads, nothing to compute", {},
         batch_function(items_per_plan=0, load_complete=(False, False, True)),
         lambda s, o, w: None if s == "SUCCEEDED" and steps_of(w) == ["plan", "load", "load", "load"]
         and o == {"run_id": "run-1", "item_count": 0, "replans": 0, "loads": 3, "load": load_report(True, 3),
                   "load_failed": None} else f"{s} {o} {steps_of(w)}")

    case("a store never complete: 20 loads, then on", {}, batch_function(load_complete=(False,)),
         lambda s, o, w: None if s == "SUCCEEDED"
         and steps_of(w) == ["plan", "publish"] + ["load"] * 20 + ["compact"]
         and o["loads"] == 20 and o["load"]["complete"] is False and o["load_failed"] is None
         else f"{s} {o} {steps_of(w)}")

    def load_failed_ok(o, loads):
        f = o.get("load_failed") or {}
        return o.get("loads") == loads and f.get("error") == "LoadError" and "connection refused" in f.get("cause", "")

    # the publish stands: a load that keeps failing is reported, never fatal
    case("a load keeps failing", {}, batch_function(load_errors=("LoadError",)),
         lambda s, o, w: None if s == "SUCCEEDED"
         and steps_of(w) == ["plan", "publish", "load", "load", "load", "load", "compact"]  # 1 + 3 retries
         and load_failed_ok(o, 1) and o["load"] is None
         and o["published"]["watermark"] == "2026-11-24T10:00:00Z" and o["compaction_failed"] == []
         else f"{s} {o} {steps_of(w)}")

    case("a load keeps failing, nothing to compute", {},
         batch_function(items_per_plan=0, load_errors=("LoadError",)),
         lambda s, o, w: None if s == "SUCCEEDED" and steps_of(w) == ["plan"] + ["load"] * 4
         and load_failed_ok(o, 1) and o["load"] is None and o["item_count"] == 0
         and set(o) == {"run_id", "item_count", "replans", "loads", "load", "load_failed"}
         else f"{s} {o} {steps_of(w)}")

    case("a load keeps failing, a day left uncompacted", {},
         batch_function(items_per_plan=0, left_uncompacted=("2026-11-23",), load_errors=("LoadError",)),
         lambda s, o, w: None if s == "SUCCEEDED" and steps_of(w) == ["plan"] + ["load"] * 4 + ["compact"]
         and load_failed_ok(o, 1) and o["compaction_failed"] == []
         else f"{s} {o} {steps_of(w)}")

    # a refill whose second load fails for good: stops loading, keeps the first
    # load's report, goes on to compact
    case("a refill whose second load fails", {},
         batch_function(load_complete=(False,), load_errors=(None, "LoadError")),
         lambda s, o, w: None if s == "SUCCEEDED"
         and steps_of(w) == ["plan", "publish"] + ["load"] * 5 + ["compact"]
         and load_failed_ok(o, 2) and o["load"] == load_report(False, 1)
         else f"{s} {o} {steps_of(w)}")

    # retried: Lambda's throttling (the transient retrier), then a LoadError
    case("a load that succeeds when retried", {},
         batch_function(load_errors=("Lambda.TooManyRequestsException", "LoadError", None)),
         lambda s, o, w: None if s == "SUCCEEDED" and len(w.steps("load")) == 3
         and o["loads"] == 1 and o["load"] == load_report(True, 3) and o["load_failed"] is None
         else f"{s} {o} {steps_of(w)}")

    bad_inputs = [
        {"from": "2026-11-01T00:00:00Z"},
        {"from": "2026-11-01T00:30:00Z", "to": "2026-11-01T06:00:00Z"},
        {"from": "2026-11-01T06:00:00Z", "to": "2026-11-01T06:00:00Z"},
        {"from": "2026-11-01T06:00:00Z", "to": "2026-11-01T00:00:00Z"},
        {"from": "yesterday", "to": "today"},
        {"from": 1, "to": 2},
        {"from": "2026-11-01T00:00:00Z", "to": "2026-11-01T06:00:00Z", "hours_per_run": 1},
        {"ranges": [hour]},
        {"source": "aws.scheduler", "detail-type": "Scheduled Event", "detail": {}},
        [],
    ]
    for i, bad in enumerate(bad_inputs):
        case(f"bad input {i} {json.dumps(bad)}", bad, batch_function(),
             lambda s, o, w: None if s == "FAILED" and o.error == "BadInput" and not w.calls else f"{s} {o}")
    return count, problems


# --------------------------------------------------------------------------


def main() -> int:
    tf_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "infra/terraform")
    defn = json.loads(json.dumps(HclEval(tf_dir).local("batch_definition")))

    problems: list[str] = []
    n_states = check_shape(defn, "batch", problems)
    if problems:
        print("\n".join(f"state machine: {p}" for p in problems), file=sys.stderr)
        return 1

    from statelint.config import Config
    from statelint.linter import Linter
    from statelint.problem import ProblemType

    # FLOAT: statelint wants BackoffRate written 2.0; Terraform's jsonencode
    # writes 2, which Step Functions takes. The two fields below are in Step
    # Functions' distributed Map (a Map's Label, an ItemReader's
    # ReaderConfig.InputType, see its ItemReader reference) and newer than
    # statelint's field lists.
    def known_gap(problem: str) -> bool:
        m = re.fullmatch(r'Field "Label" not allowed in State Machine\.States\.(\w+)', problem)
        if m:
            return defn["States"].get(m.group(1), {}).get("Type") == "Map"
        return bool(re.fullmatch(r'Field "InputType" not allowed in .*\.ItemReader\.ReaderConfig', problem))

    lint = [
        p
        for p in Linter.validate(defn, Config(ignored_problem_types={ProblemType.FLOAT}))
        if not known_gap(p)
    ]
    if lint:
        print("\n".join(f"statelint: {p}" for p in lint), file=sys.stderr)
        return 1

    n_cases, problems = scenarios(defn)
    if problems:
        print("\n".join(f"state machine: {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"{n_states} states, statelint clean, {n_cases} scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
