//! Context, stream and the per-device module cache; or the CPU SIMT simulator.

use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError};

use super::kernels::{self, KernelId};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// The bytes of a device buffer: a driver allocation, or host memory under the simulator.
pub(crate) enum DeviceBytes {
    Driver(CudaSlice<u8>),
    #[cfg(feature = "cuda-sim")]
    Sim(super::sim::SimBuf),
}

/// A device buffer of `len` elements of `T`, stored as bytes.
pub struct CudaBuffer<T> {
    pub(crate) data: DeviceBytes,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> std::fmt::Debug for CudaBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuffer({} elements)", self.len)
    }
}

/// Maps a driver error to [`Error::Device`].
pub(crate) fn driver_err(e: DriverError) -> Error {
    Error::Device {
        backend: "cuda",
        reason: format!("{e:?}"),
    }
}

/// A buffer of one engine handed to the other (a simulator buffer to a device backend or
/// the reverse).
#[cfg(feature = "cuda-sim")]
pub(crate) fn foreign_buffer() -> Error {
    Error::Device {
        backend: "cuda",
        reason: "a buffer of the CUDA simulator was passed to a device backend, or the reverse"
            .into(),
    }
}

/// What runs the kernels.
#[derive(Clone)]
pub(crate) enum Engine {
    /// A GPU through the driver: one context, one stream.
    Driver {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
    },
    /// The CPU SIMT simulator (`cuda/sim/`).
    #[cfg(feature = "cuda-sim")]
    Sim,
}

/// Streaming multiprocessors the simulator reports: an H200's, so the host code plans the
/// same grids (split-K, work units) as on that device.
#[cfg(feature = "cuda-sim")]
const SIM_SM_COUNT: u32 = 132;

/// The CUDA backend: one device, one stream, its compiled modules.
///
/// Kernels are compiled with NVRTC for the device's compute capability the first time an
/// op needs them and cached (one module per `cuda/<stem>.cu`, functions by entry name).
/// With the feature `cuda-sim`, [`CudaBackend::simulator`] runs the same host code and the
/// same kernel sources on the CPU instead (`docs/cuda.md`).
///
/// Cloning is cheap and shares the context, the stream and the caches.
#[derive(Clone)]
pub struct CudaBackend {
    engine: Engine,
    arch: String,
    sm_count: u32,
    cache: Arc<Cache>,
}

/// Compiled modules (one per kernel source), loaded functions, and the names launched.
struct Cache {
    modules: [OnceLock<Arc<CudaModule>>; KernelId::ALL.len()],
    compile_lock: Mutex<()>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    launched: Mutex<BTreeSet<&'static str>>,
}

impl Cache {
    fn new() -> Arc<Self> {
        Arc::new(Cache {
            modules: std::array::from_fn(|_| OnceLock::new()),
            compile_lock: Mutex::new(()),
            functions: Mutex::new(HashMap::new()),
            launched: Mutex::new(BTreeSet::new()),
        })
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.engine {
            Engine::Driver { ctx, .. } => {
                write!(f, "CudaBackend(ordinal {}, {})", ctx.ordinal(), self.arch)
            }
            #[cfg(feature = "cuda-sim")]
            Engine::Sim => write!(
                f,
                "CudaBackend(simulator, {} geometry, {} SMs)",
                self.arch, self.sm_count
            ),
        }
    }
}

impl CudaBackend {
    /// Opens device `ordinal`.
    ///
    /// Errors: [`Error::NoDevice`] when `libcuda` cannot be loaded, the driver finds no such
    /// device, or `libnvrtc` (needed to compile the kernels) cannot be loaded.
    pub fn new(ordinal: usize) -> Result<Self> {
        let no = |reason: String| Error::NoDevice {
            backend: "cuda",
            reason,
        };
        // SAFETY: `is_culib_present` only tries `dlopen` on the candidate names of libcuda
        // and drops the handles; no invariant is needed from us.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(no("libcuda could not be loaded (no NVIDIA driver)".into()));
        }
        if !kernels::nvrtc_available() {
            return Err(no(
                "libnvrtc could not be loaded (install `nvidia-cuda-nvrtc-cu12` and put its \
                 lib/ folder on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| no(format!("device {ordinal}: {e:?}")))?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err)?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err)?;
        let stream = ctx.default_stream();
        Ok(Self {
            engine: Engine::Driver { ctx, stream },
            arch: format!("compute_{major}{minor}"),
            sm_count: u32::try_from(sm_count).unwrap_or(1).max(1),
            cache: Cache::new(),
        })
    }

    /// The CPU SIMT simulator (feature `cuda-sim`): the kernels of `cuda/` compiled with the
    /// host C++ compiler, run deterministically (threads of a block as fibers, blocks one
    /// after another) with checks a device does not make: out-of-bounds and misaligned
    /// accesses, writes to inputs, barriers or warp intrinsics reached by part of a block or
    /// warp, shared-memory races, host arguments that do not match the kernel's signature.
    /// It reports the geometry of an H200 (132 SMs, `compute_90`). See `docs/cuda.md`.
    ///
    /// Errors: [`Error::NoDevice`] when this build has no simulator (no C++ compiler was
    /// found when it was built).
    #[cfg(feature = "cuda-sim")]
    pub fn simulator() -> Result<Self> {
        super::sim::available()?;
        Ok(Self {
            engine: Engine::Sim,
            arch: "compute_90".into(),
            sm_count: SIM_SM_COUNT,
            cache: Cache::new(),
        })
    }

    /// True when the kernels run on the CPU simulator rather than a device.
    pub fn is_simulator(&self) -> bool {
        !matches!(self.engine, Engine::Driver { .. })
    }

    /// The device name.
    pub fn device_name(&self) -> Result<String> {
        match &self.engine {
            Engine::Driver { ctx, .. } => ctx.name().map_err(driver_err),
            #[cfg(feature = "cuda-sim")]
            Engine::Sim => Ok("kvsieve SIMT simulator (cuda-sim)".into()),
        }
    }

    /// The NVRTC target (`compute_XY`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Entry names of every kernel this backend instance has launched (sorted): coverage
    /// tests check it against [`KernelId::entries`].
    pub fn launched_kernels(&self) -> Vec<&'static str> {
        let set = self
            .cache
            .launched
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.iter().copied().collect()
    }

    pub(crate) fn record_launch(&self, name: &'static str) {
        let mut set = self
            .cache
            .launched
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.insert(name);
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn stream(&self) -> Result<&Arc<CudaStream>> {
        match &self.engine {
            Engine::Driver { stream, .. } => Ok(stream),
            #[cfg(feature = "cuda-sim")]
            Engine::Sim => Err(foreign_buffer()),
        }
    }

    fn module(&self, id: KernelId) -> Result<Arc<CudaModule>> {
        let slot = &self.cache.modules[id.index()];
        if let Some(m) = slot.get() {
            return Ok(m.clone());
        }
        let ctx = match &self.engine {
            Engine::Driver { ctx, .. } => ctx,
            #[cfg(feature = "cuda-sim")]
            Engine::Sim => return Err(foreign_buffer()),
        };
        // One compilation at a time; re-check after taking the lock.
        let _guard = self
            .cache
            .compile_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.get() {
            return Ok(m.clone());
        }
        let ptx = match kernels::compile(id, &self.arch) {
            Ok(p) => p,
            // A driver newer than this NVRTC: fall back to the newest target it knows.
            Err(_) if self.arch != "compute_90" => kernels::compile(id, "compute_90")?,
            Err(e) => return Err(e),
        };
        let m = ctx.load_module(ptx).map_err(driver_err)?;
        Ok(slot.get_or_init(|| m).clone())
    }

    /// The function `name` of module `id` (compiled and loaded on first use).
    pub(crate) fn function(&self, id: KernelId, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self
            .cache
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(f.clone());
        }
        let f = self.module(id)?.load_function(name).map_err(driver_err)?;
        self.cache
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, f.clone());
        Ok(f)
    }

    /// Compiles and loads every entry point of every kernel source; returns how many. (The
    /// simulator checks that its build has every entry point.)
    pub fn load_all_kernels(&self) -> Result<usize> {
        let mut n = 0;
        for id in KernelId::ALL {
            for name in id.entries() {
                match &self.engine {
                    Engine::Driver { .. } => {
                        self.function(id, name)?;
                    }
                    #[cfg(feature = "cuda-sim")]
                    Engine::Sim => super::sim::has_kernel(name)?,
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Device-to-device copy of `src` into `dst` (equal lengths): the bandwidth baseline of
    /// the GPU benchmark.
    pub fn copy_buffer<T: Element>(
        &self,
        src: &CudaBuffer<T>,
        dst: &mut CudaBuffer<T>,
    ) -> Result<()> {
        if src.len != dst.len {
            return Err(Error::Shape {
                op: "copy_buffer",
                what: format!("src has {} elements, dst {}", src.len, dst.len),
            });
        }
        match (&src.data, &mut dst.data) {
            (DeviceBytes::Driver(s), DeviceBytes::Driver(d)) => {
                self.stream()?.memcpy_dtod(s, d).map_err(driver_err)
            }
            #[cfg(feature = "cuda-sim")]
            (DeviceBytes::Sim(s), DeviceBytes::Sim(d)) => {
                d.bytes_mut().copy_from_slice(s.bytes());
                Ok(())
            }
            #[cfg(feature = "cuda-sim")]
            _ => Err(foreign_buffer()),
        }
    }

    // ------------------------------------------------------------ raw byte buffers

    /// A zeroed buffer of `bytes` bytes (at least 16).
    pub(crate) fn scratch(&self, bytes: usize) -> Result<DeviceBytes> {
        let bytes = bytes.max(16);
        match &self.engine {
            Engine::Driver { stream, .. } => Ok(DeviceBytes::Driver(
                stream.alloc_zeros::<u8>(bytes).map_err(driver_err)?,
            )),
            #[cfg(feature = "cuda-sim")]
            Engine::Sim => Ok(DeviceBytes::Sim(super::sim::SimBuf::zeroed(bytes))),
        }
    }

    pub(crate) fn upload_bytes(&self, bytes: &[u8]) -> Result<DeviceBytes> {
        if bytes.is_empty() {
            return self.scratch(16);
        }
        match &self.engine {
            Engine::Driver { stream, .. } => Ok(DeviceBytes::Driver(
                stream.clone_htod(bytes).map_err(driver_err)?,
            )),
            #[cfg(feature = "cuda-sim")]
            Engine::Sim => {
                let mut b = super::sim::SimBuf::zeroed(bytes.len());
                b.bytes_mut().copy_from_slice(bytes);
                Ok(DeviceBytes::Sim(b))
            }
        }
    }

    pub(crate) fn upload_u32(&self, v: &[u32]) -> Result<DeviceBytes> {
        self.upload_bytes(bytemuck::cast_slice(v))
    }

    pub(crate) fn upload_f32(&self, v: &[f32]) -> Result<DeviceBytes> {
        self.upload_bytes(bytemuck::cast_slice(v))
    }

    pub(crate) fn zero(&self, s: &mut DeviceBytes) -> Result<()> {
        match s {
            DeviceBytes::Driver(d) => self.stream()?.memset_zeros(d).map_err(driver_err),
            #[cfg(feature = "cuda-sim")]
            DeviceBytes::Sim(b) => {
                b.bytes_mut().fill(0);
                Ok(())
            }
        }
    }

    /// The first `n` bytes of `s` (a device error if it is shorter: an internal bug).
    pub(crate) fn download_bytes(&self, s: &DeviceBytes, n: usize) -> Result<Vec<u8>> {
        match s {
            DeviceBytes::Driver(d) => {
                let mut bytes = self.stream()?.clone_dtoh(d).map_err(driver_err)?;
                head(&bytes, n)?;
                bytes.truncate(n);
                Ok(bytes)
            }
            #[cfg(feature = "cuda-sim")]
            DeviceBytes::Sim(b) => Ok(head(b.bytes(), n)?.to_vec()),
        }
    }

    pub(crate) fn download_u32(&self, s: &DeviceBytes, len: usize) -> Result<Vec<u32>> {
        Ok(pod_vec(&self.download_bytes(s, len * 4)?))
    }

    pub(crate) fn download_f32(&self, s: &DeviceBytes, len: usize) -> Result<Vec<f32>> {
        Ok(pod_vec(&self.download_bytes(s, len * 4)?))
    }

    pub(crate) fn write_bytes(&self, dst: &mut DeviceBytes, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        match dst {
            DeviceBytes::Driver(d) => {
                let mut view = d.slice_mut(0..bytes.len());
                self.stream()?
                    .memcpy_htod(bytes, &mut view)
                    .map_err(driver_err)
            }
            #[cfg(feature = "cuda-sim")]
            DeviceBytes::Sim(b) => {
                let len = b.bytes().len();
                b.bytes_mut()
                    .get_mut(..bytes.len())
                    .ok_or_else(|| Error::Device {
                        backend: "cuda",
                        reason: format!("write of {} bytes into {len}", bytes.len()),
                    })?
                    .copy_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// Waits for the device (the simulator runs every launch to completion).
    pub(crate) fn wait(&self) -> Result<()> {
        match &self.engine {
            Engine::Driver { stream, .. } => stream.synchronize().map_err(driver_err),
            #[cfg(feature = "cuda-sim")]
            Engine::Sim => Ok(()),
        }
    }

    pub(crate) fn buffer<T: Element>(&self, data: DeviceBytes, len: usize) -> CudaBuffer<T> {
        CudaBuffer {
            data,
            len,
            _t: PhantomData,
        }
    }
}

impl<T> CudaBuffer<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// The first `n` bytes, or a device error if the buffer is shorter (an internal bug).
pub(crate) fn head(bytes: &[u8], n: usize) -> Result<&[u8]> {
    bytes.get(..n).ok_or_else(|| Error::Device {
        backend: "cuda",
        reason: format!("buffer holds {} bytes, expected at least {n}", bytes.len()),
    })
}

/// Copies bytes into a vector of `T` (`bytes.len()` a multiple of `size_of::<T>()`).
pub(crate) fn pod_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / size_of::<T>();
    let mut v = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&bytes[..n * size_of::<T>()]);
    v
}
