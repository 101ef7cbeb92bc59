import XCTest
@testable import ImageFormats
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import TestSupport
import Synchronization

/// A scratch folder of images made by qemu-img from one seeded source disk, for the fuzz
/// and sweep campaigns.
struct FuzzImages {
    let dir: String

    init() throws {
        dir = NSTemporaryDirectory() + "fuzz-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    func remove() { try? FileManager.default.removeItem(atPath: dir) }

    @discardableResult
    func run(_ args: [String]) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        return p.terminationStatus
    }

    /// A 6 MiB source disk: random data in some 64 KiB pieces, zeros and holes elsewhere.
    func source() throws -> String {
        let path = dir + "/src.raw"
        var rng = SeededRandom(seed: 7)
        var bytes = [UInt8](repeating: 0, count: 6 << 20)
        for piece in stride(from: 0, to: bytes.count, by: 65536) where rng.next() % 3 == 0 {
            for i in piece..<(piece + 65536) { bytes[i] = UInt8(truncatingIfNeeded: rng.next()) }
        }
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return path
    }

    /// Writes `bytes` to `path` as a sparse file: only the 64 KiB pieces that are not all
    /// zeros (a VHDX is mostly the gaps between its regions; writing them dense for every
    /// case made its campaigns the suite's slowest).
    static func write(_ path: String, _ bytes: [UInt8]) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        defer { close(fd) }
        _ = ftruncate(fd, off_t(bytes.count))
        let piece = 65536
        let zeros = [UInt8](repeating: 0, count: piece)
        bytes.withUnsafeBytes { all in
            var at = 0
            while at < all.count {
                let n = min(piece, all.count - at)
                if memcmp(all.baseAddress! + at, zeros, n) != 0 { _ = pwrite(fd, all.baseAddress! + at, n, off_t(at)) }
                at += n
            }
        }
    }

    /// How long one case may run before it counts as a hang (RAWMOUNT_FUZZ_HANG_SECONDS).
    static let hangSeconds = Double(ProcessInfo.processInfo.environment["RAWMOUNT_FUZZ_HANG_SECONDS"] ?? "") ?? 10

    /// Runs `body` on a thread of its own and returns what it returned, or nil when it is still
    /// running after `seconds` (a hang: the case is then reported, the thread left behind).
    static func watched<T: Sendable>(seconds: Double = hangSeconds, _ body: @escaping @Sendable () -> T) -> T? {
        let result = Mutex<T?>(nil)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let r = body()
            result.withLock { $0 = r }
            done.signal()
        }
        guard done.wait(timeout: .now() + seconds) == .success else { return nil }
        return result.withLock { $0 }
    }

    /// The source acquired by libewf's ewfacquire (`options` before the paths) as one EWF
    /// segment file named `name` (…E01, …s01 or …e01 as the format names it), as bytes.
    func ewfImage(_ name: String, _ options: [String]) throws -> [UInt8] {
        let target = dir + "/" + name
        XCTAssertEqual(try run(["ewfacquire", "-u", "-q"] + options + ["-t", String(target.dropLast(4)), try source()]), 0, "ewfacquire \(options)")
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: target)))
    }

    /// Makes every checksum of an EWF segment right again after a change, at the places the
    /// original's sections have them (descriptors, volume/data, table headers and entries,
    /// hash, digest), so damage reaches the parsing behind the checksums. Writes only there.
    static func ewfChecksumFixer(_ original: [UInt8]) -> @Sendable (inout [UInt8]) -> Void { ewfChecksums(original).fix }

    /// The fixer, and the 4-byte ranges it writes.
    static func ewfChecksums(_ original: [UInt8]) -> (fix: @Sendable (inout [UInt8]) -> Void, at: [Range<Int>]) {
        var sums: [(at: Int, from: Int, to: Int)] = []
        var at = 13
        while at + 76 <= original.count && sums.count < 1000 {
            let type = String(decoding: original[at..<(at + 16)].prefix { $0 != 0 }, as: UTF8.self)
            let next = Int(le64(original, at + 16))
            sums.append((at + 72, at, at + 72))
            let data = at + 76
            switch type {
            case "volume", "disk": sums.append((data + 1048, data, data + 1048))
            case "data" where next - data >= 1052: sums.append((data + 1048, data, data + 1048))
            case "table", "table2":
                let n = Int(le32(original, data))
                sums.append((data + 20, data, data + 20))
                if next - data >= 24 + 4 * n + 4 { sums.append((data + 24 + 4 * n, data + 24, data + 24 + 4 * n)) }
            case "hash": sums.append((data + 32, data, data + 32))
            case "digest": sums.append((data + 76, data, data + 76))
            default: break
            }
            if next <= at { break }
            at = next
        }
        let fixes = sums
        return ({ b in
            for f in fixes where f.at + 4 <= b.count && f.to <= b.count {
                put32(&b, f.at, ewfAdler32(b[f.from..<f.to]))
            }
        }, fixes.map { $0.at ..< $0.at + 4 })
    }

    /// The source converted by qemu-img (`convertArgs` before the two paths), as bytes.
    func image(_ name: String, _ convertArgs: [String]) throws -> [UInt8] {
        let out = dir + "/" + name
        XCTAssertEqual(try run(["qemu-img", "convert"] + convertArgs + [try source(), out]), 0, "qemu-img convert \(convertArgs)")
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    }
}
