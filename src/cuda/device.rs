//! Context, stream and the per-device module cache.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError};

use super::kernels::{self, KernelId};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// A device buffer of `len` elements of `T`, stored as bytes.
pub struct CudaBuffer<T> {
    pub(crate) data: CudaSlice<u8>,
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

/// The CUDA backend: one device, one stream, its compiled modules.
///
/// Kernels are compiled with NVRTC for the device's compute capability the first time an
/// op needs them and cached (one module per `cuda/<stem>.cu`, functions by entry name).
///
/// Cloning is cheap and shares the context, the stream and the caches.
#[derive(Clone)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sm_count: u32,
    cache: Arc<Cache>,
}

/// Compiled modules (one per kernel source) and loaded functions.
struct Cache {
    modules: [OnceLock<Arc<CudaModule>>; KernelId::ALL.len()],
    compile_lock: Mutex<()>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBackend(ordinal {}, {})",
            self.ctx.ordinal(),
            self.arch
        )
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
            ctx,
            stream,
            arch: format!("compute_{major}{minor}"),
            sm_count: u32::try_from(sm_count).unwrap_or(1).max(1),
            cache: Arc::new(Cache {
                modules: std::array::from_fn(|_| OnceLock::new()),
                compile_lock: Mutex::new(()),
                functions: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The device name.
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(driver_err)
    }

    /// The NVRTC target (`compute_XY`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn module(&self, id: KernelId) -> Result<Arc<CudaModule>> {
        let slot = &self.cache.modules[id.index()];
        if let Some(m) = slot.get() {
            return Ok(m.clone());
        }
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
        let m = self.ctx.load_module(ptx).map_err(driver_err)?;
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

    /// Compiles and loads every entry point of every kernel source; returns how many.
    pub fn load_all_kernels(&self) -> Result<usize> {
        let mut n = 0;
        for id in KernelId::ALL {
            for name in id.entries() {
                self.function(id, name)?;
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
        self.stream
            .memcpy_dtod(&src.data, &mut dst.data)
            .map_err(driver_err)
    }

    // ------------------------------------------------------------ raw byte buffers

    pub(crate) fn upload_bytes(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return self.stream.alloc_zeros::<u8>(16).map_err(driver_err);
        }
        self.stream.clone_htod(bytes).map_err(driver_err)
    }

    pub(crate) fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u8>> {
        self.upload_bytes(bytemuck::cast_slice(v))
    }

    pub(crate) fn upload_f32(&self, v: &[f32]) -> Result<CudaSlice<u8>> {
        self.upload_bytes(bytemuck::cast_slice(v))
    }

    /// Uninitialised-free scratch: `bytes` zeroed bytes (at least 16).
    pub(crate) fn scratch(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>(bytes.max(16))
            .map_err(driver_err)
    }

    pub(crate) fn zero(&self, s: &mut CudaSlice<u8>) -> Result<()> {
        self.stream.memset_zeros(s).map_err(driver_err)
    }

    pub(crate) fn download_u32(&self, s: &CudaSlice<u8>, len: usize) -> Result<Vec<u32>> {
        let bytes = self.stream.clone_dtoh(s).map_err(driver_err)?;
        Ok(pod_vec(head(&bytes, len * 4)?))
    }

    pub(crate) fn download_f32(&self, s: &CudaSlice<u8>, len: usize) -> Result<Vec<f32>> {
        let bytes = self.stream.clone_dtoh(s).map_err(driver_err)?;
        Ok(pod_vec(head(&bytes, len * 4)?))
    }

    pub(crate) fn write_bytes(&self, dst: &mut CudaSlice<u8>, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(0..bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut view)
            .map_err(driver_err)
    }

    pub(crate) fn buffer<T: Element>(&self, data: CudaSlice<u8>, len: usize) -> CudaBuffer<T> {
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
