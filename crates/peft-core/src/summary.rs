//! PEFT's `print_trainable_parameters()` line.

use std::fmt;

/// Trainable and total parameter counts, printed exactly as PEFT prints them.
///
/// "All params" includes the adapter's own parameters, as PEFT counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableSummary {
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// Every parameter of the adapted model.
    pub all: usize,
}

impl TrainableSummary {
    /// Trainable share in percent.
    pub fn percent(&self) -> f64 {
        if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        }
    }
}

/// Formats `n` with `,` thousands separators, as Python's `{:,d}`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for TrainableSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.percent()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_peft_line() {
        // PEFT for BLOOM-1b4 with LoRA r=8 on query_key_value.
        let s = TrainableSummary {
            trainable: 1_572_864,
            all: 1_304_684_544,
        };
        assert_eq!(
            s.to_string(),
            "trainable params: 1,572,864 || all params: 1,304,684,544 || trainable%: 0.1206"
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(
            TrainableSummary {
                trainable: 1234,
                all: 5678
            }
            .to_string(),
            "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330"
        );
    }
}
