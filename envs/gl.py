"""Headless OpenGL for MuJoCo: pick EGL (else OSMesa) before mujoco is imported, and say which
renderer is in use, because software rendering is hundreds of times slower than a GPU's."""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install EGL (Debian/Ubuntu: `apt-get install libegl1 libgl1-mesa-dri`) or OSMesa "
    "(`apt-get install libosmesa6`), or set MUJOCO_GL to a backend that works on this machine "
    "(egl, osmesa, glfw)"
)


class RenderingUnavailableError(RuntimeError):
    """No OpenGL backend could create a rendering context."""


def choose_backend() -> str:
    """Set MUJOCO_GL to egl (or osmesa when only libOSMesa exists) unless the user set it.

    Must run before `import mujoco`, which reads the variable once at import time."""
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    if "mujoco" in sys.modules:
        logger.warning(
            "mujoco was imported before envs with MUJOCO_GL unset, so it chose a windowed GL "
            "backend; headless rendering needs MUJOCO_GL=egl (or osmesa) set before mujoco is "
            "imported, or `import envs` first"
        )
        return ""
    backend = "egl"
    if ctypes.util.find_library("EGL") is None and ctypes.util.find_library("OSMesa") is not None:
        backend = "osmesa"
    os.environ["MUJOCO_GL"] = backend
    if backend == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    return backend


_gl_pid: int | None = None  # the process that first opened a GL context


def make_renderer(model, height: int, width: int):
    """A mujoco.Renderer, or one RenderingUnavailableError that names the packages to install."""
    global _gl_pid
    import mujoco

    if _gl_pid is not None and _gl_pid != os.getpid():
        # Mesa/EGL state does not survive fork(): rendering in the child would hang.
        raise RenderingUnavailableError(
            "this process was forked after its parent had opened an OpenGL context, and "
            "rendering here would hang; start workers with the 'spawn' or 'forkserver' method, "
            "e.g. gymnasium.vector.AsyncVectorEnv(env_fns, context='spawn')"
        )
    try:
        renderer = mujoco.Renderer(model, height=height, width=width)
        _gl_pid = os.getpid()
        if _renderer_name is None:
            _log_renderer_name(renderer)
        return renderer
    except Exception as err:  # the backends raise ImportError, RuntimeError, GLError, ...
        raise RenderingUnavailableError(
            f"MuJoCo could not open an OpenGL context (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
            f"{err}. To render headless, {INSTALL_HINT}."
        ) from err


_renderer_name: str | None = None


def _log_renderer_name(renderer) -> None:
    """Read GL_RENDERER from a fresh renderer's context and log it, once per process."""
    global _renderer_name
    from OpenGL import GL

    renderer.render()  # makes its context current
    raw = GL.glGetString(GL.GL_RENDERER)
    _renderer_name = raw.decode() if isinstance(raw, bytes) else str(raw)
    software = any(s in _renderer_name.lower() for s in ("llvmpipe", "softpipe", "swrast"))
    logger.info(
        "MuJoCo renders with %s (%s, MUJOCO_GL=%s)",
        _renderer_name,
        "software rendering on the CPU: slow" if software else "hardware",
        os.environ.get("MUJOCO_GL"),
    )


def gl_renderer_name() -> str:
    """The GL_RENDERER string MuJoCo renders with (e.g. 'llvmpipe ...' = software rendering)."""
    if _renderer_name is None:
        import mujoco

        make_renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 16, 16).close()
    return _renderer_name
