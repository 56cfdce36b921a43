//! Compiles every `src/bpf/*.bpf.c` into `$OUT_DIR/NAME.bpf.o` with clang
//! (`-target bpf -O2 -g`: `-g` makes the BTF the kernel needs for the maps).
//!
//! `-target bpf` has no system include directory of its own, so the kernel's
//! `asm/` headers come from the Debian multiarch directory of the cargo
//! target (`/usr/include/<arch>-<os>-<env><abi>`, e.g. `x86_64-linux-gnu`,
//! `aarch64-linux-gnu`, `arm-linux-gnueabihf`); `BPF_SYS_INCLUDE=DIR`
//! overrides it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn cfg(key: &str) -> String {
    std::env::var(format!("CARGO_CFG_TARGET_{key}")).unwrap_or_default()
}

/// The multiarch directories the target's `asm/` headers may live in, best
/// first: the target's own tuple, then its glibc one (linux-libc-dev installs
/// the kernel headers there also for musl builds).
fn multiarch_candidates() -> Vec<PathBuf> {
    let (arch, os, env, abi) = (cfg("ARCH"), cfg("OS"), cfg("ENV"), cfg("ABI"));
    let little = cfg("ENDIAN") == "little";
    // Debian's names where they differ from Rust's target_arch.
    let arch = match arch.as_str() {
        "x86" => "i386".to_owned(),
        "powerpc64" if little => "powerpc64le".to_owned(),
        "mips" | "mips64" if little => format!("{arch}el"),
        _ => arch,
    };
    let mut envs = vec![if env.is_empty() {
        "gnu".to_owned()
    } else {
        env
    }];
    if envs[0] != "gnu" {
        envs.push("gnu".to_owned());
    }
    envs.iter()
        .map(|e| PathBuf::from(format!("/usr/include/{arch}-{os}-{e}{abi}")))
        .collect()
}

fn sys_include() -> PathBuf {
    println!("cargo:rerun-if-env-changed=BPF_SYS_INCLUDE");
    if let Some(d) = std::env::var_os("BPF_SYS_INCLUDE") {
        return PathBuf::from(d);
    }
    let cands = multiarch_candidates();
    cands
        .iter()
        .find(|d| d.join("asm").is_dir())
        .cloned()
        .unwrap_or_else(|| {
            let tried: Vec<String> = cands.iter().map(|d| d.display().to_string()).collect();
            fail(&format!(
                "no kernel asm/ headers in {} (`make deps` installs linux-libc-dev; \
                 BPF_SYS_INCLUDE=DIR names another directory)",
                tried.join(" or ")
            ))
        })
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
    let sys_include = sys_include();
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
            .arg("-I")
            .arg(&sys_include)
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
