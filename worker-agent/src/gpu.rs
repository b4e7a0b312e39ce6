//! GPU facts from `nvidia-smi`'s CSV query. No NVIDIA GPU (or no driver) means
//! CPU mode, said plainly in the log, never an error.

use std::process::Command;

use troop_schemas::protocol::GpuInfo;

/// The fields asked of `nvidia-smi`, in the order [`parse_csv`] reads them.
pub const QUERY: &str = "name,memory.total,memory.used,utilization.gpu,temperature.gpu";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    Gpus(Vec<GpuInfo>),
    /// Why there are no GPU facts: the agent serves in CPU mode.
    CpuOnly(String),
}

/// Parses `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` output.
/// Fields the driver cannot read (`[N/A]`, `[Not Supported]`) become 0.
pub fn parse_csv(text: &str) -> Result<Vec<GpuInfo>, String> {
    let mut gpus = Vec::new();
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [name, total, used, util, temp] = fields[..] else {
            return Err(format!(
                "line {}: expected 5 fields, got {}: {line:?}",
                n + 1,
                fields.len()
            ));
        };
        let num = |s: &str| -> Result<u64, String> {
            if s.starts_with('[') {
                return Ok(0);
            }
            s.parse::<u64>()
                .map_err(|_| format!("line {}: {s:?} is not a whole number", n + 1))
        };
        if name.is_empty() || name.len() > troop_schemas::protocol::MAX_TEXT_BYTES {
            return Err(format!("line {}: bad GPU name", n + 1));
        }
        gpus.push(GpuInfo {
            name: name.to_owned(),
            memory_total_mib: num(total)?,
            memory_used_mib: num(used)?,
            utilization_pct: num(util)?,
            temperature_c: num(temp)?,
        });
    }
    Ok(gpus)
}

/// Runs `nvidia-smi` (from `$PATH`, or `smi` when given).
pub fn detect(smi: Option<&str>) -> Detection {
    let program = smi.unwrap_or("nvidia-smi");
    let out = match Command::new(program)
        .arg(format!("--query-gpu={QUERY}"))
        .arg("--format=csv,noheader,nounits")
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            return Detection::CpuOnly(format!(
                "{program} not found ({e}): no NVIDIA GPU or driver"
            ));
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Detection::CpuOnly(format!("{program} failed ({}): {}", out.status, err.trim()));
    }
    match parse_csv(&String::from_utf8_lossy(&out.stdout)) {
        Ok(gpus) if gpus.is_empty() => Detection::CpuOnly(format!("{program} lists no GPU")),
        Ok(gpus) => Detection::Gpus(gpus),
        Err(e) => Detection::CpuOnly(format!("{program} output not understood: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_driver_output() {
        // Shape of `nvidia-smi` 550 output on an 8-GPU host, one line per GPU.
        let text = "NVIDIA H100 80GB HBM3, 81559, 1, 0, 31\nNVIDIA GeForce RTX 4090, 24564, 1210, 37, 45\nTesla T4, 15360, [N/A], [Not Supported], 40\n";
        let gpus = parse_csv(text).expect("parses");
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].memory_total_mib, 81_559);
        assert_eq!(gpus[1].utilization_pct, 37);
        assert_eq!((gpus[2].memory_used_mib, gpus[2].utilization_pct), (0, 0));
    }

    #[test]
    fn parses_an_h100_under_load() {
        // Captured from driver 580.159.04 by ops/gpu-check.sh while the GPU ran
        // bf16 matrix products with 20 GiB allocated.
        let gpus = parse_csv("NVIDIA H100 80GB HBM3, 81559, 21363, 100, 55\n").expect("parses");
        assert_eq!(
            gpus,
            vec![GpuInfo {
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_mib: 81_559,
                memory_used_mib: 21_363,
                utilization_pct: 100,
                temperature_c: 55,
            }]
        );
        // Without `nounits` the same driver writes "81559 MiB": refused, not misread.
        assert!(parse_csv("NVIDIA H100 80GB HBM3, 81559 MiB, 0 MiB, 0 %, 30").is_err());
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        assert!(parse_csv("NVIDIA H100, 80GB, 1, 0, 31").is_err());
        assert!(parse_csv("only, three, fields").is_err());
        assert_eq!(parse_csv("\n"), Ok(vec![]));
    }

    #[test]
    fn no_driver_means_cpu_mode() {
        assert!(
            matches!(detect(Some("/nonexistent/nvidia-smi")), Detection::CpuOnly(why) if why.contains("not found"))
        );
        assert!(matches!(detect(Some("false")), Detection::CpuOnly(_)));
    }
}
