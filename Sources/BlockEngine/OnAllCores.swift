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

/// `work(k)` for every k below `count`, spread over the cores (one alone on the calling
/// thread), when only success matters: the first error is thrown once every k is done, so
/// nothing is still being written after (lighter than `onAllCores`: no results are kept).
public func eachOnAllCores(_ count: Int, _ work: (Int) throws -> Void) throws {
    if count == 1 { return try work(0) }
    let failure = Mutex<(any Error)?>(nil)
    withoutActuallyEscaping(work) { work in
        nonisolated(unsafe) let work = work  // concurrentPerform returns after every iteration
        DispatchQueue.concurrentPerform(iterations: count) { k in
            do { try work(k) } catch { failure.withLock { if $0 == nil { $0 = error } } }
        }
    }
    if let error = failure.withLock({ $0 }) { throw error }
}
