import Foundation
import XCTest
import TestSupport

/// Split raw evidence made by `split` (numeric and letter suffixes), mounted from its first
/// piece: one disk, equal to the file it was split from; read-only unless --format
/// splitraw asks for writes; damaged sets refused naming the piece.
final class SplitRawTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    private func disk(_ s: Scratch) throws -> (path: String, bytes: Data) {
        var rng = SeededRandom(seed: 41)
        var bytes = Data(count: 10_000_000)
        for piece in stride(from: 0, to: bytes.count - 4096, by: 4096 * 3) {
            bytes.replaceSubrange(piece ..< piece + 4096, with: rng.bytes(4096))
        }
        let path = s.path("disk.dd")
        try bytes.write(to: URL(fileURLWithPath: path))
        return (path, bytes)
    }

    func testPiecesReadAsOneDiskReadOnly() throws {
        let s = try Scratch()
        let (path, bytes) = try disk(s)
        try Harness.run(["split", "-b", "3M", "-d", "-a", "3", "--numeric-suffixes=1", path, path + "."])
        try Harness.run(["split", "-b", "3M", path, s.path("ev.")])
        for first in [path + ".001", s.path("ev.aa")] {
            let before = try Files.sha(first)
            let r = try Harness.run([Harness.rawmount, "mount", "--log", s.serverLog, first, s.mnt])
            XCTAssertTrue(r.err.contains("read-only"), r.err)
            try s.forgetMount(s.mnt)
            let raw = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: s.mnt).first { $0.hasSuffix(".raw") })
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: s.mnt + "/" + raw)), bytes, first)
            XCTAssertEqual(open(s.mnt + "/" + raw, O_WRONLY), -1)
            try Harness.run([Harness.rawmount, "unmount", s.mnt])
            XCTAssertEqual(try Files.sha(first), before)
            // hash, info and convert see the one disk too.
            let sha = try Harness.run(["sha256sum", path]).out.prefix(64)
            XCTAssertTrue(try Harness.run([Harness.rawmount, "hash", first]).out.contains(String(sha)))
            let info = try Harness.run([Harness.rawmount, "info", first]).out
            XCTAssertTrue(info.contains("format: splitraw") && info.contains("pieces: 4 of 3145728 bytes"), info)
        }
    }

    /// Asked for by --format splitraw, writes land in the right pieces.
    func testWritesWhenAskedLandInThePieces() throws {
        let s = try Scratch()
        var (path, bytes) = try disk(s)
        try Harness.run(["split", "-b", "3M", "-d", "-a", "3", "--numeric-suffixes=1", path, path + "."])
        try s.mount(path + ".001", options: ["--format", "splitraw"])
        let raw = s.mnt + "/disk.dd.raw"
        var rng = SeededRandom(seed: 5)
        for at in [UInt64(3 << 20) - 100, 7 << 20, 9_999_000] {  // across a boundary, inside, at the end
            let b = rng.bytes(1000)
            try Files.pwrite(raw, b, at: at)
            bytes.replaceSubrange(Int(at) ..< Int(at) + 1000, with: b)
        }
        try s.unmount()
        var joined = Data()
        for i in 1...4 { joined += try Data(contentsOf: URL(fileURLWithPath: path + ".00\(i)")) }
        XCTAssertEqual(joined, bytes)
    }

    func testDamagedSetsAreRefusedNamingThePiece() throws {
        let s = try Scratch()
        let (path, _) = try disk(s)
        try Harness.run(["split", "-b", "3M", "-d", "-a", "3", "--numeric-suffixes=1", path, path + "."])
        // A middle piece cut short.
        try Harness.run(["truncate", "-s", "1M", path + ".002"])
        try s.assertMountRefused(["-r", path + ".001"], mentions: ["disk.dd.002", "bytes where the other pieces have"], "short piece")
        // A middle piece missing while later ones exist.
        try FileManager.default.removeItem(atPath: path + ".002")
        try s.assertMountRefused(["-r", path + ".001"], mentions: ["disk.dd.002", "missing", "disk.dd.003"], "missing piece")
    }
}
