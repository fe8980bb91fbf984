//! Splitting one run over many processes (a Slurm job array, a Kubernetes Indexed Job, or hand-started
//! processes): every process plans the whole run, then keeps its own part of it.
//!
//! The split is a pure function of the plan and the shard count, so N processes that never talk to
//! each other agree on it, and the union of their files is exactly the unsharded run's. Images are
//! dealt by estimated cost (largest first, each to the least-loaded shard) because sizes cost very
//! different amounts: one 768² image is worth about six at 224².

use anyhow::{bail, Context, Result};

/// The `index`-th (from 0) of `count` disjoint parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// The largest shard count we accept: far beyond any array job, small enough to catch a typo.
const MAX_SHARDS: usize = 100_000;

/// The environment variable that gives a Kubernetes Indexed Job's shard count (its `completions`),
/// when `--shards` does not.
pub const SHARDS_ENV: &str = "SDSCALE_SHARDS";

impl Shard {
    /// `K/N`, K counted from 0 (as Kubernetes' completion index and `--array=0-(N-1)` count).
    pub fn parse(text: &str) -> Result<Self> {
        let usage = || format!("--shard {text:?} is not K/N; write e.g. 0/4 (K counts from 0 to N-1)");
        let (index, count) = text.split_once('/').with_context(usage)?;
        let index: usize = index.trim().parse().ok().with_context(usage)?;
        let count: usize = count.trim().parse().ok().with_context(usage)?;
        Self::new(index, count).with_context(|| format!("--shard {text}"))
    }

    fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || count > MAX_SHARDS {
            bail!("the shard count {count} is out of range; use 1 to {MAX_SHARDS}");
        }
        if index >= count {
            bail!("shard {index} of {count} does not exist: shards count from 0 to {}", count - 1);
        }
        Ok(Self { index, count })
    }

    /// The shard this process runs: `--shard` if given, else one set by a Slurm array task or a
    /// Kubernetes Indexed Job, else none. The second value says where it came from, for stderr.
    pub fn choose(
        flag: Option<&str>,
        shards_flag: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<(Shard, String)>> {
        if let Some(text) = flag {
            return Ok(Some((Self::parse(text)?, format!("--shard {text}"))));
        }
        let number = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(value) => value
                    .trim()
                    .parse()
                    .map(Some)
                    .ok()
                    .with_context(|| format!("${name} is {value:?}, not a whole number")),
            }
        };
        if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let missing = |name: &str| format!("$SLURM_ARRAY_TASK_ID is set but ${name} is not; pass --shard K/N");
            let count = number("SLURM_ARRAY_TASK_COUNT")?.with_context(|| missing("SLURM_ARRAY_TASK_COUNT"))?;
            let min = number("SLURM_ARRAY_TASK_MIN")?.with_context(|| missing("SLURM_ARRAY_TASK_MIN"))?;
            let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let offset = id.checked_sub(min).filter(|offset| offset % step == 0);
            let shard = offset.map(|offset| offset / step).and_then(|index| Self::new(index, count).ok());
            let Some(shard) = shard else {
                bail!(
                    "Slurm array task {id} (min {min}, step {step}, {count} tasks) is not one of a contiguous \
                     range: use --array=0-{} or pass --shard K/N",
                    count.saturating_sub(1)
                );
            };
            let how = format!("Slurm array task {id} of {count}");
            return Ok(Some((shard, how)));
        }
        if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let count = match shards_flag {
                Some(count) => count,
                None => number(SHARDS_ENV)?.with_context(|| {
                    format!(
                        "$JOB_COMPLETION_INDEX is {index} (a Kubernetes Indexed Job) but the shard count is unknown: \
                         pass --shards N or set ${SHARDS_ENV} to the Job's completions (or --shard 0/1 to run all)"
                    )
                })?,
            };
            let shard = Self::new(index, count).context("Kubernetes Indexed Job")?;
            return Ok(Some((shard, format!("Kubernetes completion index {index} of {count}"))));
        }
        if shards_flag.is_some() {
            bail!("--shards N is for Kubernetes Indexed Jobs ($JOB_COMPLETION_INDEX is not set); use --shard K/N");
        }
        Ok(None)
    }

    /// Which of the images, given their estimated costs in plan order, belong to this shard.
    pub fn select(self, costs: &[f64]) -> Vec<bool> {
        assign(costs, self.count).into_iter().map(|shard| shard == self.index).collect()
    }
}

/// Deals images to `count` shards: the most expensive first (ties in plan order), each to the shard
/// with the least work so far (ties to the lowest shard). Deterministic: the same inputs give the same
/// answer in every process.
pub fn assign(costs: &[f64], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0.0f64; count.max(1)];
    let mut shard_of = vec![0; costs.len()];
    for image in order {
        let lightest = (0..load.len()).min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b))).unwrap_or(0);
        load[lightest] += costs[image];
        shard_of[image] = lightest;
    }
    shard_of
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn choose(flag: Option<&str>, shards: Option<usize>, vars: &[(&str, &str)]) -> Result<Option<(Shard, String)>> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Shard::choose(flag, shards, |name| vars.get(name).cloned())
    }

    #[test]
    fn parse_counts_from_zero_and_refuses_what_does_not_exist() {
        assert_eq!(Shard::parse("2/3").unwrap(), Shard { index: 2, count: 3 });
        for bad in ["3/3", "1/0", "x/3", "1", "-1/3", "1/3/4"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        assert!(format!("{:#}", Shard::parse("3/3").unwrap_err()).contains("0 to 2"));
    }

    #[test]
    fn slurm_and_kubernetes_variables_choose_the_shard() {
        let slurm = [("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_MIN", "3")];
        assert_eq!(choose(None, None, &slurm).unwrap().unwrap().0, Shard { index: 2, count: 4 });
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        assert_eq!(choose(None, None, &stepped).unwrap().unwrap().0, Shard { index: 2, count: 3 });
        let gap = [("SLURM_ARRAY_TASK_ID", "7"), ("SLURM_ARRAY_TASK_COUNT", "3"), ("SLURM_ARRAY_TASK_MIN", "1")];
        assert!(format!("{:#}", choose(None, None, &gap).unwrap_err()).contains("--array=0-2"));

        let k8s = [("JOB_COMPLETION_INDEX", "1")];
        assert_eq!(choose(None, Some(3), &k8s).unwrap().unwrap().0, Shard { index: 1, count: 3 });
        let k8s_env = [("JOB_COMPLETION_INDEX", "1"), (SHARDS_ENV, "2")];
        assert_eq!(choose(None, None, &k8s_env).unwrap().unwrap().0, Shard { index: 1, count: 2 });
        assert!(format!("{:#}", choose(None, None, &k8s).unwrap_err()).contains("--shards N"));

        // The flag wins over the environment; nothing set means no sharding.
        assert_eq!(choose(Some("0/2"), None, &slurm).unwrap().unwrap().0, Shard { index: 0, count: 2 });
        assert_eq!(choose(None, None, &[]).unwrap(), None);
        assert!(choose(None, Some(2), &[]).is_err());
    }

    #[test]
    fn shards_partition_the_run_and_balance_its_cost() {
        // 3 prompts × sizes 224², 512², 768² (costs roughly as the sizes' UNet work).
        let costs: Vec<f64> = (0..3).flat_map(|_| [1.0, 5.0, 13.0]).collect();
        for count in 1..=5 {
            let shard_of = assign(&costs, count);
            let mut load = vec![0.0; count];
            for (image, &shard) in shard_of.iter().enumerate() {
                load[shard] += costs[image];
            }
            let (max, min) = (load.iter().cloned().fold(0.0, f64::max), load.iter().cloned().fold(f64::MAX, f64::min));
            // Greedy largest-first: no shard exceeds another by more than the largest single image.
            assert!(max - min <= 13.0, "{count} shards: {load:?}");
            let selected: usize =
                (0..count).map(|index| Shard { index, count }.select(&costs).iter().filter(|&&s| s).count()).sum();
            assert_eq!(selected, costs.len());
        }
        assert_eq!(assign(&costs, 3), assign(&costs, 3));
    }
}
