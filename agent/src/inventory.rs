//! What this machine offers: hostname, CPU, memory and GPUs. GPUs come from
//! one source, the `--fake-gpus` fixture or the machine; everything after
//! the source is the same code.

use drover_proto::{GpuInfo, GpuMetrics, Inventory};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use std::sync::Arc;

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn memory_mb() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Parses `[COUNTx]MODEL:VRAM_MB[,...]`, e.g. `4xA100:81920,RTX4090:24564`.
pub fn parse_fake_gpus(spec: &str) -> Result<Vec<GpuInfo>, String> {
    let mut gpus = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |why: &str| {
            format!("--fake-gpus {part:?}: {why}; expected [COUNTx]MODEL:VRAM_MB like 4xA100:81920")
        };
        let (head, vram) = part
            .rsplit_once(':')
            .ok_or_else(|| bad("missing :VRAM_MB"))?;
        let vram_mb: u64 = vram.parse().map_err(|_| bad("VRAM_MB is not a number"))?;
        if vram_mb == 0 {
            return Err(bad("VRAM_MB must be more than 0"));
        }
        let (count, model) = match head.split_once('x') {
            Some((n, model)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => (
                n.parse::<u32>().map_err(|_| bad("COUNT is not a number"))?,
                model,
            ),
            _ => (1, head),
        };
        if model.is_empty() {
            return Err(bad("MODEL is empty"));
        }
        if count == 0 || count > 64 {
            return Err(bad("COUNT must be 1 to 64"));
        }
        for _ in 0..count {
            let index = gpus.len() as u32;
            gpus.push(GpuInfo {
                index,
                uuid: format!("GPU-fake-{index:04}"),
                model: model.to_string(),
                vram_mb,
            });
        }
    }
    if gpus.is_empty() {
        return Err("--fake-gpus is empty".into());
    }
    if gpus.len() > 64 {
        return Err("--fake-gpus: at most 64 GPUs".into());
    }
    Ok(gpus)
}

/// Where GPU data comes from.
#[derive(Clone)]
pub enum GpuSource {
    /// `--fake-gpus`: synthetic but plausible metrics.
    Fake(Vec<GpuInfo>),
    /// The machine's GPUs, through NVML.
    Nvml(Arc<Nvml>, Vec<GpuInfo>),
    /// No GPUs: a CPU worker.
    None,
}

impl std::fmt::Debug for GpuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuSource::Fake(g) => write!(f, "Fake({} GPUs)", g.len()),
            GpuSource::Nvml(_, g) => write!(f, "Nvml({} GPUs)", g.len()),
            GpuSource::None => f.write_str("None"),
        }
    }
}

const MIB: u64 = 1024 * 1024;

impl GpuSource {
    /// The fixture when given; otherwise NVML, loaded at run time. Without
    /// it the agent is a CPU worker and says why, once.
    /// The GPUs here, quietly: the fixture, NVML's GPUs, `None` when NVML
    /// loads but sees none, or NVML's error.
    pub fn probe(fake: Option<Vec<GpuInfo>>) -> Result<GpuSource, String> {
        if let Some(gpus) = fake {
            return Ok(GpuSource::Fake(gpus));
        }
        let nvml = Nvml::init().map_err(|e| e.to_string())?;
        let count = nvml.device_count().map_err(|e| e.to_string())?;
        let gpus: Vec<GpuInfo> = (0..count)
            .filter_map(|index| {
                let d = nvml.device_by_index(index).ok()?;
                Some(GpuInfo {
                    index,
                    uuid: d.uuid().ok()?,
                    model: d.name().ok()?,
                    vram_mb: d.memory_info().ok()?.total / MIB,
                })
            })
            .collect();
        Ok(if gpus.is_empty() {
            GpuSource::None
        } else {
            GpuSource::Nvml(Arc::new(nvml), gpus)
        })
    }

    pub fn detect(fake: Option<Vec<GpuInfo>>) -> GpuSource {
        let has_devices = std::path::Path::new("/dev/nvidiactl").exists();
        match GpuSource::probe(fake) {
            Ok(GpuSource::Fake(gpus)) => {
                log::info!("using {} fake GPUs from --fake-gpus", gpus.len());
                GpuSource::Fake(gpus)
            }
            Ok(GpuSource::Nvml(nvml, gpus)) => {
                for g in &gpus {
                    log::info!("GPU {} {} {} MiB {}", g.index, g.model, g.vram_mb, g.uuid);
                }
                GpuSource::Nvml(nvml, gpus)
            }
            Ok(GpuSource::None) => {
                log::info!("NVML sees no usable GPU: running as a CPU worker");
                GpuSource::None
            }
            Err(e) if has_devices => {
                log::warn!(
                    "NVML did not load ({e}) although /dev/nvidiactl exists: running as a CPU worker. Try: {}",
                    crate::suggest::NVML
                );
                GpuSource::None
            }
            Err(e) => {
                log::info!("no NVIDIA GPUs here (NVML: {e}): running as a CPU worker");
                GpuSource::None
            }
        }
    }

    pub fn gpus(&self) -> Vec<GpuInfo> {
        match self {
            GpuSource::Fake(g) | GpuSource::Nvml(_, g) => g.clone(),
            GpuSource::None => Vec::new(),
        }
    }

    /// Current metrics; `busy` are the indices held by running jobs (used
    /// only by the fixture, which has nothing to measure).
    pub fn metrics(&self, busy: &[u32]) -> Vec<GpuMetrics> {
        match self {
            GpuSource::Fake(gpus) => gpus
                .iter()
                .map(|g| {
                    let used = busy.contains(&g.index);
                    GpuMetrics {
                        index: g.index,
                        utilization_pct: if used { 87.0 } else { 0.0 },
                        memory_used_mb: if used { g.vram_mb / 2 } else { 0 },
                        temperature_c: if used { 71.0 } else { 34.0 },
                        power_w: if used { 280.0 } else { 55.0 },
                    }
                })
                .collect(),
            GpuSource::Nvml(nvml, gpus) => gpus
                .iter()
                .map(|g| {
                    let mut m = GpuMetrics {
                        index: g.index,
                        ..Default::default()
                    };
                    match nvml.device_by_index(g.index) {
                        Ok(d) => {
                            if let Ok(u) = d.utilization_rates() {
                                m.utilization_pct = f64::from(u.gpu);
                            }
                            if let Ok(mem) = d.memory_info() {
                                m.memory_used_mb = mem.used / MIB;
                            }
                            if let Ok(t) = d.temperature(TemperatureSensor::Gpu) {
                                m.temperature_c = f64::from(t);
                            }
                            if let Ok(p) = d.power_usage() {
                                m.power_w = f64::from(p) / 1000.0;
                            }
                        }
                        Err(e) => log::debug!("GPU {} metrics unavailable: {e}", g.index),
                    }
                    m
                })
                .collect(),
            GpuSource::None => Vec::new(),
        }
    }
}

pub fn inventory(source: &GpuSource) -> Inventory {
    Inventory {
        hostname: hostname(),
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_mb: memory_mb(),
        gpus: source.gpus(),
        // Known once the agent has looked at its cgroup (`cgroup`).
        can_limit: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_gpu_specs() {
        let g = parse_fake_gpus("4xA100:81920,RTX4090:24564").unwrap();
        assert_eq!(g.len(), 5);
        assert_eq!(g[0].model, "A100");
        assert_eq!(g[3].vram_mb, 81920);
        assert_eq!(g[4].model, "RTX4090");
        assert_eq!(g[4].index, 4);
        assert_eq!(parse_fake_gpus("xA:1").unwrap()[0].model, "xA");
        for bad in [
            "",
            "A100",
            "A100:big",
            "0xA100:10",
            "2x:10",
            "A100:0",
            "65xA:1",
        ] {
            assert!(parse_fake_gpus(bad).is_err(), "{bad:?} should be refused");
        }
    }

    proptest::proptest! {
        #[test]
        fn fake_gpu_parser_never_panics(spec in "[ -~]{0,40}") {
            if let Ok(gpus) = parse_fake_gpus(&spec) {
                proptest::prop_assert!(!gpus.is_empty() && gpus.len() <= 64);
                proptest::prop_assert!(gpus.iter().all(|g| g.vram_mb > 0 && !g.model.is_empty()));
            }
        }
    }

    #[test]
    fn fake_metrics_follow_use() {
        let src = GpuSource::Fake(parse_fake_gpus("2xT4:16384").unwrap());
        let m = src.metrics(&[1]);
        assert_eq!(m[0].utilization_pct, 0.0);
        assert!(m[1].utilization_pct > 50.0);
    }
}
