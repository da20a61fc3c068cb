//! Build script: with the feature `cuda-sim`, compiles the CUDA kernels for the CPU SIMT
//! simulator (`cuda/sim/`, `docs/cuda.md`). Without it, it does nothing.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvsieve_sim)");
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda-sim")]
    sim::build();
}

/// The simulation build of `cuda/`: every `cuda/<stem>.cu` (and the simulator-only test
/// kernels `cuda/sim/<stem>.cu`) is compiled with the host C++ compiler after
/// `cuda/sim/kvsim.h` and `cuda/common.cuh`, instrumented with `-fsanitize=thread` (the
/// simulator implements the sanitizer's access hooks itself), together with the simulator
/// `cuda/sim/kvsim.cpp`, into one static library.
///
/// The kernels of a source are found by preprocessing it with `KVSIM_SCAN`, which turns
/// `__global__` into a marker: each marked function gets a row of the launch table. Adding a
/// kernel or a source to `cuda/` needs no change here.
///
/// Without a C++ compiler the simulator is left out (a warning; `CudaBackend::simulator`
/// then returns `Error::NoDevice`). With one, a kernel that does not compile fails the build.
#[cfg(feature = "cuda-sim")]
mod sim {
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};

    struct Source {
        stem: String,
        path: PathBuf,
    }

    fn sources(dir: &Path) -> Vec<Source> {
        let mut v: Vec<Source> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cuda-sim: cannot read {}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .map(|path| Source {
                stem: path.file_stem().unwrap().to_string_lossy().into_owned(),
                path,
            })
            .collect();
        v.sort_by(|a, b| a.stem.cmp(&b.stem));
        v
    }

    /// `#line` + the file's text, so that `__FILE__` and compiler messages name
    /// `cuda/<file>` relative to the crate root.
    fn embed(out: &mut String, root: &Path, path: &Path) {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cuda-sim: cannot read {}: {e}", path.display()));
        let rel = path.strip_prefix(root).unwrap_or(path);
        writeln!(out, "#line 1 \"{}\"", rel.display()).unwrap();
        out.push_str(&text);
        out.push('\n');
    }

    /// Kernels of a preprocessed source: `(name, launch bounds expression or "0")`.
    fn scan(expanded: &str) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let mut rest = expanded;
        while let Some(i) = rest.find("kvsim_scan_global") {
            rest = &rest[i + "kvsim_scan_global".len()..];
            let mut s = rest.trim_start();
            s = s
                .strip_prefix("void")
                .expect("cuda-sim: a __global__ function must return void")
                .trim_start();
            let mut bounds = "0".to_string();
            if let Some(b) = s.strip_prefix("kvsim_scan_bounds") {
                let b = b
                    .trim_start()
                    .strip_prefix('(')
                    .expect("__launch_bounds__(");
                let mut depth = 1;
                let end = b
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += i32::from(c == '(') - i32::from(c == ')');
                        depth == 0
                    })
                    .map(|(j, _)| j)
                    .expect("cuda-sim: unbalanced __launch_bounds__");
                let args = &b[..end];
                bounds = format!("({})", args.split(',').next().unwrap().trim());
                s = b[end + 1..].trim_start();
            }
            let name: String = s
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !name.is_empty(),
                "cuda-sim: no kernel name after __global__"
            );
            found.push((name, bounds));
        }
        found
    }

    fn compiler_works() -> Result<(), String> {
        let tool = cc::Build::new()
            .cpp(true)
            .cargo_metadata(false)
            .try_get_compiler()
            .map_err(|e| e.to_string())?;
        let out = tool
            .to_command()
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", tool.path().display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{} --version failed", tool.path().display()))
        }
    }

    pub fn build() {
        let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
        let cuda = root.join("cuda");
        let simdir = cuda.join("sim");
        println!("cargo::rerun-if-changed={}", cuda.display());
        if let Err(why) = compiler_works() {
            println!(
                "cargo::warning=cuda-sim: no working C++ compiler ({why}); the CUDA simulator \
                 is left out of this build"
            );
            return;
        }
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kvsim");
        std::fs::create_dir_all(&out).unwrap();
        let mut all = sources(&cuda);
        all.extend(sources(&simdir));

        let base = |b: &mut cc::Build| {
            b.cpp(true)
                .std("c++17")
                .opt_level(2)
                .debug(false)
                .include(&simdir)
                .flag("-fno-strict-aliasing")
                .flag_if_supported("-Wno-unknown-pragmas")
                .flag_if_supported("-Wno-sign-compare")
                .flag_if_supported("-Wno-unused-parameter");
        };
        let mut units = Vec::new();
        let mut registry = String::from("#include \"kvsim.h\"\n");
        let mut table = String::new();
        for src in &all {
            let mut tu = String::from("#include \"kvsim.h\"\n");
            embed(&mut tu, &root, &cuda.join("common.cuh"));
            embed(&mut tu, &root, &src.path);
            let unit = out.join(format!("{}.cpp", src.stem));
            std::fs::write(&unit, &tu).unwrap();
            let mut pre = cc::Build::new();
            base(&mut pre);
            let expanded = pre
                .define("KVSIM_SCAN", None)
                .file(&unit)
                .cargo_metadata(false)
                .try_expand()
                .unwrap_or_else(|e| panic!("cuda-sim: preprocessing {}: {e}", src.path.display()));
            let kernels = scan(&String::from_utf8_lossy(&expanded));
            tu.push_str("\n// ---- launch table (build.rs)\nstatic const kvsim::Entry kvsim_entries[] = {\n");
            for (name, bounds) in &kernels {
                writeln!(tu, "    KVSIM_ENTRY({name}, {bounds}),").unwrap();
            }
            if kernels.is_empty() {
                tu.push_str("    {nullptr, 0, nullptr, 0, nullptr},\n");
            }
            writeln!(
                tu,
                "}};\nextern \"C\" const kvsim::Entry* kvsim_entries_{stem}(std::size_t* n) {{\n    \
                 *n = {n};\n    return kvsim_entries;\n}}",
                stem = src.stem,
                n = kernels.len()
            )
            .unwrap();
            std::fs::write(&unit, &tu).unwrap();
            units.push(unit);
            writeln!(
                registry,
                "extern \"C\" const kvsim::Entry* kvsim_entries_{}(std::size_t*);",
                src.stem
            )
            .unwrap();
            writeln!(table, "    &kvsim_entries_{},", src.stem).unwrap();
        }
        write!(
            registry,
            "namespace kvsim {{\nusing EntriesFn = const Entry* (*)(std::size_t*);\n\
             extern const EntriesFn stems[] = {{\n{table}    nullptr,\n}};\n}}\n"
        )
        .unwrap();
        let reg = out.join("registry.cpp");
        std::fs::write(&reg, registry).unwrap();

        // The simulator itself: not instrumented.
        let mut rt = cc::Build::new();
        base(&mut rt);
        let rt_objs = rt
            .file(simdir.join("kvsim.cpp"))
            .file(&reg)
            .compile_intermediates();

        let mut k = cc::Build::new();
        base(&mut k);
        let clang = k.get_compiler().is_like_clang();
        k.flag("-fsanitize=thread");
        if clang {
            k.flag("-mllvm").flag("-tsan-instrument-func-entry-exit=0");
        } else {
            k.flag("--param=tsan-instrument-func-entry-exit=0");
        }
        k.files(&units).objects(&rt_objs).compile("kvsim");
        println!("cargo::rustc-cfg=kvsieve_sim");
    }
}
