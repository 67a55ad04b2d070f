"""jaxdp.audit as a package: its face keeps every public name, and its modules share public names only."""

import ast
import os

import jaxdp.audit
import jaxdp.audit.bounds
import jaxdp.audit.canaries
import jaxdp.audit.fdp
import jaxdp.audit.guesses

PACKAGE = os.path.dirname(jaxdp.audit.__file__)
# The names jaxdp.audit exported when it was one module (before issue 17); callers rely on them.
FACE = (
    "AUDIT_TESTS",
    "SABOTAGES",
    "AuditBound",
    "AuditResult",
    "FdpAuditResult",
    "TradeoffCurve",
    "audit_config",
    "audit_training_run",
    "epsilon_lower_bound",
    "fdp_audit",
    "fdp_p_value",
    "noise_ratio_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
)


def test_the_face_exports_every_public_name():
    assert set(FACE) <= set(jaxdp.audit.__all__)
    # Each exported name is the public name of one module of the package, the same object.
    modules = [jaxdp.audit.bounds, jaxdp.audit.canaries, jaxdp.audit.fdp, jaxdp.audit.guesses]
    for name in jaxdp.audit.__all__:
        homes = [m for m in modules if name in m.__all__]
        assert len(homes) == 1, (name, homes)
        assert getattr(homes[0], name) is getattr(jaxdp.audit, name)


def test_no_module_imports_another_modules_underscore_names():
    for filename in sorted(os.listdir(PACKAGE)):
        if not filename.endswith(".py"):
            continue
        with open(os.path.join(PACKAGE, filename)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxdp"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{filename} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                # e.g. rules._number: a module's underscore attribute
                assert not (node.attr.startswith("_") and not node.attr.startswith("__")) or node.value.id in (
                    "self",
                    "cls",
                ), f"{filename} uses {node.value.id}.{node.attr}"
