import Dispatch
import Synchronization

/// `work(k)` for every k below `count`, spread over the cores; the results (or errors) in
/// order of k, so a caller can report the first failure as a serial loop would have.
public func onAllCores<T: Sendable>(_ count: Int, _ work: (Int) throws -> T) -> [Result<T, any Error>] {
    let results = Mutex<[Result<T, any Error>?]>(Array(repeating: nil, count: count))
    withoutActuallyEscaping(work) { work in
        // concurrentPerform returns only after every iteration: `work` does not escape.
        nonisolated(unsafe) let work = work
        DispatchQueue.concurrentPerform(iterations: count) { k in
            let r = Result { try work(k) }
            results.withLock { $0[k] = r }
        }
    }
    return results.withLock { $0 }.map { $0! }
}
