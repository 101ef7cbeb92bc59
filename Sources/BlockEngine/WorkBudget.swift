/// A bound on the work one status walk (SEEK_DATA/SEEK_HOLE, st_blocks, info's allocation)
/// may do. A hostile image can alias every table entry to one table, or hold 2^32 tiny
/// pages, so a walk over the whole disk could take minutes while its caller sits in
/// uninterruptible sleep; past the budget the walk stops and answers conservatively.
public struct WorkBudget: Sendable {
    public let steps: Int
    public let seconds: Double
    private var used = 0
    private var deadline: Double

    public init(steps: Int, seconds: Double) {
        self.steps = steps
        self.seconds = seconds
        deadline = monotonicSeconds() + seconds
    }

    /// For one lseek: generous enough for any image whose metadata is not hostile.
    public static var seek: WorkBudget { WorkBudget(steps: 1 << 20, seconds: 0.5) }
    /// For st_blocks on a stat: a stat must stay quick.
    public static var stat: WorkBudget { WorkBudget(steps: 1 << 18, seconds: 0.1) }
    /// For `rawmount info` and `check`-like reports.
    public static var report: WorkBudget { WorkBudget(steps: 1 << 22, seconds: 5) }

    /// Spends one step; false once the budget is gone. The clock is read every 64 steps.
    public mutating func spend() -> Bool {
        used += 1
        if used > steps { return false }
        if used & 63 == 0 && monotonicSeconds() > deadline { used = steps + 1; return false }
        return true
    }
}
