//! Compiles every `src/bpf/*.bpf.c` into `$OUT_DIR/NAME.bpf.o` with clang
//! (`-target bpf -O2 -g`: `-g` makes the BTF the kernel needs for the maps).

use std::path::{Path, PathBuf};
use std::process::Command;

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR unset")));
    let src = Path::new("src/bpf");
    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    if Command::new(&clang).arg("--version").output().is_err() {
        fail(&format!(
            "graft-ebpf needs `{clang}` to compile its eBPF programs: run `make deps` (installs clang, llvm and libbpf-dev)"
        ));
    }
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .unwrap_or_else(|e| fail(&format!("read {}: {e}", src.display())))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.ends_with(".bpf.c") => n.trim_end_matches(".c").to_owned(),
            _ => continue,
        };
        let obj = out.join(format!("{name}.o"));
        let st = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-Isrc/bpf")
            .arg("-c")
            .arg(&path)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| fail(&format!("run {clang}: {e}")));
        if !st.success() {
            fail(&format!(
                "{clang} failed on {} (headers missing? `make deps` installs libbpf-dev)",
                path.display()
            ));
        }
    }
}
