"""Helpers for test_trt_api_names.py: collect from sdrt's source (AST) the names sdrt looks up on the TensorRT
and cuda-python APIs (binding_wheels.py reads the names the real bindings define).

The source is walked, not listed by hand, so a new call in sdrt is checked without anyone remembering to.
Which values are API objects is derived from data flow, not guessed from variable names:
- the import (`import tensorrt as trt`, `from cuda.bindings import runtime as rt`) is one; so is an attribute,
  a call result (TensorRT only: cuda-python returns (err, value) tuples) or an item of one, `getattr(obj,
  "s", d)` on one, and `a or b` / `a if c else b` when a side is; `.name`, `.value` and dunders (enums' str
  and int, `__version__`) are looked up but give plain Python values;
- a function returning one is a factory (`import_tensorrt`, `_create_context`, cuda's `runtime`); one
  returning a tuple is one per position (`build_preflight` -> tensorrt, rt, gpu);
- a parameter is one when a call in sdrt passes it one (`_create_context(trt, self.engine)`);
- `self.x = obj` gives the class an API attribute, on `self` and on a variable annotated with the class or
  assigned `Class(...)` (`session: TrtSession` -> `session.runtime`);
- `Api.results`: the struct sdrt's `check(rt, rt.F(...))` unwraps, for the fields sdrt reads.
Uses: every `.attr` on an API object, every `getattr/hasattr(obj, "s")` (a probe), every method a subclass
of an API class defines (TensorRT calls `ILogger.log`).
Version branches: an if (or `x if c else y`) testing a probe, or a variable bound to one, runs its body only
where the probed names exist, and its else (or, after a body ending in return/raise, the rest of the block)
only where one is missing when the test is nothing but probes. `try`/`except AttributeError` bodies and
handlers are alternatives. A test naming one of `Api.gates` (sdrt's own version flags) can't be evaluated.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace


PLAIN = {"name", "value"}  # enums' str and int (pybind11 and Cython): looked up, not API objects


@dataclass(frozen=True)
class Api:
    imports: tuple[str, ...]  # the module(s) imported as this API
    through_calls: bool  # a method's result is again an API object (TensorRT) or a plain tuple (cuda-python)
    gates: frozenset[str] = frozenset()  # sdrt's own version flags: a test on them can't be evaluated
    results: dict = field(default_factory=dict)  # function -> chain of what sdrt's check() unwraps


@dataclass(frozen=True)
class Cond:
    """A use's branch runs only where all `names` exist (present=True), only where one is missing
    (present=False, exact) or anywhere (present=False, not exact); present=None: can't tell (a gate)."""
    names: frozenset
    present: bool | None
    exact: bool = True


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    code: str
    name: str  # the name looked up
    chain: tuple | None  # its path from the API module (None: past a call), for cuda-python's import check
    probe: bool = False  # a getattr/hasattr probe: may be missing
    conds: tuple = ()
    fallback: tuple | None = None  # (try id, "try" | "except") for try/except AttributeError

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.code}"

    @property
    def guarded(self) -> bool:
        return self.probe or bool(self.conds) or self.fallback is not None


def required(use: Use, have) -> bool | None:
    """Whether `use` runs on a version defining the names `have` (None: behind a gate)."""
    for c in use.conds:
        if c.present is None:
            return None
        ok = all(n in have for n in c.names)
        if (c.present and not ok) or (not c.present and c.exact and ok):
            return False
    return True


def _own(node, out=None) -> list:
    """The nodes of a function or module, not those of the functions and classes in it."""
    out = [] if out is None else out
    for child in ast.iter_child_nodes(node):
        out.append(child)
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            _own(child, out)
    return out


def _called(call):
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _extend(chain, name):
    return None if chain is None else chain + (name,)


def _merge(table: dict, key, chain) -> None:
    """Record an API object's chain; two different ones make it unknown (None)."""
    table[key] = chain if table.get(key, chain) == chain else None


class Collector:
    """The uses of `api` in `files` ({label: source}), by the rules of the module docstring."""

    def __init__(self, api: Api, files: dict[str, str]):
        self.api, self.trees = api, {f: ast.parse(src) for f, src in files.items()}
        self.defs, self.parent = [], {}  # [(file, class, def)]; def -> the def or module around it
        for f, tree in self.trees.items():
            self._find_defs(f, tree, None, tree)
        self.own = {n: _own(n) for n in [*self.trees.values(), *(d for _f, _c, d in self.defs)]}
        self.by_name = {}  # call name -> [(file, class, def)]; a class's __init__ under the class's name
        for f, cls, d in self.defs:
            self.by_name.setdefault(cls if d.name == "__init__" else d.name, []).append((f, cls, d))
        # factory -> chain; factory -> {position: chain}; (def, param) -> chain; class -> {attr: chain};
        # class -> {attr: sdrt class} (`self.session = session`, annotated TrtSession)
        self.factories, self.tuples, self.params, self.attrs, self.attr_types = {}, {}, {}, {}, {}
        self.scopes, self.gates_seen = {}, set()
        for _ in range(10):  # to a fixed point
            before = self._state()
            for f, cls, node in [(f, None, t) for f, t in self.trees.items()] + self.defs:
                self._learn(node, cls)
            if before == self._state():
                break

    def _state(self) -> str:
        return repr((self.factories, self.tuples, sorted(map(str, self.params.items())), self.attrs, self.attr_types))

    def _type(self, e, s) -> str | None:
        """The sdrt class of `e`, where known: `self`, annotated or `Class(...)` names, their typed attributes."""
        if isinstance(e, ast.Name):
            return s.types.get(e.id)
        return self.attr_types.get(self._type(e.value, s), {}).get(e.attr) if isinstance(e, ast.Attribute) else None

    def _find_defs(self, file, node, cls, parent):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.defs.append((file, cls, child))
                self.parent[child] = parent
                self._find_defs(file, child, None, child)
            else:
                self._find_defs(file, child, child.name if isinstance(child, ast.ClassDef) else cls, parent)

    def chain(self, e, s):
        """e's path from the API module, None for an API object past a call, False for no API object."""
        if isinstance(e, ast.Name):
            return s.roots.get(e.id, False)
        if isinstance(e, ast.Attribute):
            if e.attr in PLAIN or e.attr.startswith("__"):
                return False
            base = self.chain(e.value, s)
            if base is not False:
                return _extend(base, e.attr)
            return self.attrs.get(self._type(e.value, s), {}).get(e.attr, False)
        if isinstance(e, ast.Call):
            probed = self.probe_name(e, s)
            if probed and _called(e) == "getattr":
                base = self.chain(e.args[0], s)
                return False if probed in PLAIN or probed.startswith("__") else _extend(base, probed)
            if self.chain(e.func, s) is not False:
                return None if self.api.through_calls else False
            if _called(e) in self.factories:
                return self.factories[_called(e)]
            for arg in e.args:  # check(rt, rt.cudaGetDeviceProperties(d), ...)
                if isinstance(arg, ast.Call) and _called(arg) in self.api.results and self.is_api(arg.func, s):
                    return self.api.results[_called(arg)]
            return False
        if isinstance(e, ast.Subscript) and self.api.through_calls:
            return None if self.is_api(e.value, s) else False
        if isinstance(e, (ast.BoolOp, ast.IfExp)):
            sides = e.values if isinstance(e, ast.BoolOp) else [e.body, e.orelse]
            return next((c for c in (self.chain(v, s) for v in sides) if c is not False), False)
        return False

    def is_api(self, e, s) -> bool:
        return self.chain(e, s) is not False

    def probe_name(self, e, s) -> str | None:
        """"s" for getattr(api_obj, "s", ...) / hasattr(api_obj, "s")."""
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id in ("getattr", "hasattr") \
                and len(e.args) >= 2 and isinstance(e.args[1], ast.Constant) and isinstance(e.args[1].value, str) \
                and self.is_api(e.args[0], s):
            return e.args[1].value
        return None

    def _scope(self, node, cls):
        outer = self.scopes.get(self.parent.get(node))
        s = SimpleNamespace(roots=dict(outer.roots) if outer else {}, probes=dict(outer.probes) if outer else {},
                            types={"self": cls} if cls else {})  # name -> chain; -> probed names; -> class
        args = getattr(node, "args", None)
        for a in (args.posonlyargs + args.args + args.kwonlyargs) if args else []:
            if (node, a.arg) in self.params:
                s.roots[a.arg] = self.params[node, a.arg]
            if isinstance(a.annotation, ast.Name):
                s.types[a.arg] = a.annotation.id
        for _ in range(2):  # an assignment may use a name bound further down the walk
            for n in self.own[node]:
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    for alias in n.names:
                        if (f"{n.module}.{alias.name}" if isinstance(n, ast.ImportFrom) else alias.name) \
                                in self.api.imports:
                            s.roots[alias.asname or alias.name.split(".")[0]] = ()
                elif isinstance(n, ast.Assign):
                    for target in n.targets:
                        self._bind(target, n.value, s)
        return s

    def _bind(self, target, value, s):
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts):
                self._bind(t, v, s)
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Call):
            for i, c in self.tuples.get(_called(value), {}).items():
                if i < len(target.elts) and isinstance(target.elts[i], ast.Name):
                    s.roots[target.elts[i].id] = c
        elif isinstance(target, ast.Name) and self.is_api(value, s):
            s.roots[target.id] = self.chain(value, s)
            if self.probe_name(value, s):
                s.probes[target.id] = frozenset([self.probe_name(value, s)])
        elif isinstance(target, ast.Name) and isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
            s.types[target.id] = value.func.id

    def _learn(self, node, cls):
        s = self.scopes[node] = self._scope(node, cls)
        for n in self.own[node]:
            if isinstance(n, ast.Return) and n.value is not None and hasattr(node, "name"):
                if self.is_api(n.value, s):
                    _merge(self.factories, node.name, self.chain(n.value, s))
                for i, e in enumerate(n.value.elts if isinstance(n.value, ast.Tuple) else []):
                    if self.is_api(e, s):
                        _merge(self.tuples.setdefault(node.name, {}), i, self.chain(e, s))
            elif isinstance(n, ast.Assign) and cls:
                for lhs in n.targets:  # self.x = v, or self.x, self.y = v, w
                    both = isinstance(lhs, ast.Tuple) and isinstance(n.value, ast.Tuple)
                    for t, v in zip(lhs.elts, n.value.elts) if both else [(lhs, n.value)]:
                        if not (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                and t.value.id == "self"):
                            continue
                        if self.is_api(v, s):
                            _merge(self.attrs.setdefault(cls, {}), t.attr, self.chain(v, s))
                        elif self._type(v, s):
                            self.attr_types.setdefault(cls, {})[t.attr] = self._type(v, s)
            elif isinstance(n, ast.Call) and not self.is_api(n.func, s):
                for _f, c, d in self._callees(n, s):
                    params = [a.arg for a in d.args.posonlyargs + d.args.args][1 if c else 0:]
                    for param, arg in [*zip(params, n.args), *((k.arg, k.value) for k in n.keywords if k.arg)]:
                        if self.is_api(arg, s):
                            _merge(self.params, (d, param), self.chain(arg, s))

    def _callees(self, call, s):
        """The sdrt functions `call` may run: `f()` a module-level function or class f; `mod.f()` f in
        mod.py; `obj.f()` a method f of obj's class when known (`self`, annotated, assigned), else any."""
        f, defs = call.func, self.by_name.get(_called(call), ())
        if isinstance(f, ast.Name):
            return [d for d in defs if d[1] is None or d[1] == f.id]
        owner = self._type(f.value, s) if isinstance(f, ast.Attribute) else None
        module = [d for d in defs if d[1] is None and isinstance(f, ast.Attribute)
                  and isinstance(f.value, ast.Name) and Path(d[0]).stem == f.value.id]
        return module if module and owner is None else [d for d in defs if d[1] and owner in (None, d[1])]

    def uses(self) -> list[Use]:
        out = []
        for f, tree in self.trees.items():
            _Uses(self, f, out).visit(tree)
        return out


class _Uses(ast.NodeVisitor):
    def __init__(self, coll: Collector, file: str, out: list):
        self.c, self.file, self.out = coll, file, out
        self.scope, self.conds, self.fallback, self.tries = coll.scopes[coll.trees[file]], [], None, 0

    def add(self, node, name, base, probe=False, code=None):
        self.out.append(Use(self.file, node.lineno, code or ast.unparse(node), name,
                            _extend(base, name), probe, tuple(self.conds), self.fallback))

    def visit_FunctionDef(self, node):
        outer, self.scope = self.scope, self.c.scopes[node]
        self.generic_visit(node)
        self.scope = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        for base in node.bases:  # methods TensorRT calls back (ILogger.log)
            for f in node.body if self.c.is_api(base, self.scope) else []:
                if isinstance(f, ast.FunctionDef) and not f.name.startswith("__"):
                    self.add(f, f.name, self.c.chain(base, self.scope), code=f"{ast.unparse(base)}.{f.name} (def)")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        base = self.c.chain(node.value, self.scope)
        if base is not False:
            self.add(node, node.attr, base)
        self.generic_visit(node)

    def visit_Call(self, node):
        name = self.c.probe_name(node, self.scope)
        if name:
            self.add(node, name, self.c.chain(node.args[0], self.scope), probe=True)
        self.generic_visit(node)

    def branch(self, test):
        """(body condition, else condition) for an if-test holding a probe or a gate, else None."""
        probes, gate, other = set(), False, False
        for n in ast.walk(test):
            if self.c.probe_name(n, self.scope):
                probes.add(self.c.probe_name(n, self.scope))
            elif isinstance(n, ast.Name) and n.id in self.scope.probes:
                probes |= self.scope.probes[n.id]
            elif isinstance(n, ast.Name) and n.id in self.c.api.gates:
                gate = True
                self.c.gates_seen.add(n.id)
            elif isinstance(n, ast.Name) and n.id not in ("getattr", "hasattr") and n.id not in self.scope.roots:
                other = True
        p = frozenset(probes)
        if gate or (p and any(isinstance(n, ast.BoolOp) and isinstance(n.op, ast.Or) for n in ast.walk(test))):
            return Cond(p, None), Cond(p, None)
        if not p:
            return None
        if not other and ((isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not))
                          or (isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.Is))):
            return Cond(p, False), Cond(p, True)  # `if not hasattr(...)`, `if v is None`
        return Cond(p, True), Cond(p, False, exact=not other)

    def visit_If(self, node):  # also `x if c else y`
        self.visit(node.test)
        for cond, part in zip(self.branch(node.test) or (None, None), (node.body, node.orelse)):
            self.conds += [cond] if cond else []
            self.block(part) if isinstance(part, list) else self.visit(part)
            del self.conds[len(self.conds) - bool(cond):]

    visit_IfExp = visit_If

    def visit_Try(self, node):
        alt = any(isinstance(n, ast.Name) and n.id == "AttributeError"
                  for h in node.handlers if h.type is not None for n in ast.walk(h.type))
        outer, self.tries = self.fallback, self.tries + 1
        gid = (self.file, self.tries)
        self.fallback = (gid, "try") if alt else outer
        self.block(node.body)
        self.fallback = (gid, "except") if alt else outer
        for h in node.handlers:
            self.block(h.body)
        self.fallback = outer
        self.block(node.orelse + node.finalbody)

    def generic_visit(self, node):
        for _name, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                self.block(value)
            elif isinstance(value, (list, ast.AST)):
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, ast.AST):
                        self.visit(v)

    def block(self, stmts):
        """A statement list; after `if probe: ... return`, the rest of the list is that if's else."""
        pushed = 0
        for st in stmts:
            self.visit(st)
            if isinstance(st, ast.If) and not st.orelse and isinstance(st.body[-1], (ast.Return, ast.Raise)) \
                    and self.branch(st.test):
                self.conds.append(self.branch(st.test)[1])
                pushed += 1
        del self.conds[len(self.conds) - pushed:]
