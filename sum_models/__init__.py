"""SUM upstream user model: user tower, mix tower, loss, Normalized Entropy, snapshots and shift metrics."""
