import XCTest
import Foundation
@testable import BlockEngine
@testable import ImageFormats
import TestSupport

/// The table counts behind st_blocks and `info` (`AllocationCounting`) against two answers
/// they must equal: the status walk over the same range (for the whole disk and for random
/// ranges whose ends fall inside clusters, grains, subclusters and sectors, as partitions
/// do), and, for the whole disk, the data bytes of `qemu-img map`.
final class AllocationCountTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "count-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    @discardableResult
    func run(_ args: [String], output: UnsafeMutablePointer<Data>? = nil) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = output == nil ? FileHandle.nullDevice : pipe
        p.standardError = FileHandle.nullDevice
        try p.run()
        if let output { output.pointee = pipe.fileHandleForReading.readDataToEndOfFile() }
        p.waitUntilExit()
        return p.terminationStatus
    }

    /// 24 MiB: random pieces of 512 B to 192 KiB at random sector offsets, some of them
    /// zeros (qemu-img keeps those unallocated), holes elsewhere.
    func source() throws -> String {
        let path = dir + "/src.raw"
        var rng = SeededRandom(seed: 14)
        var bytes = [UInt8](repeating: 0, count: 24 << 20)
        for _ in 0..<120 {
            let length = Int(1 + rng.next() % 384) * 512
            let at = Int(rng.next() % UInt64(bytes.count - length)) / 512 * 512
            let zeros = rng.next() % 5 == 0
            for i in at..<(at + length) { bytes[i] = zeros ? 0 : UInt8(truncatingIfNeeded: rng.next() | 1) }
        }
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return path
    }

    /// Sum of `qemu-img map`'s data extents.
    func qemuData(_ path: String, format: String) throws -> UInt64 {
        var out = Data()
        XCTAssertEqual(try run(["qemu-img", "map", "--output=json", "-f", format, path], output: &out), 0)
        let entries = try JSONSerialization.jsonObject(with: out) as? [[String: Any]] ?? []
        return entries.reduce(0) { $0 + (($1["data"] as? Bool) == true ? UInt64($1["length"] as? Int ?? 0) : 0) }
    }

    func check(_ path: String, format: ImageFormat, qemuFormat: String?, seed: UInt64) throws {
        let device = try ImageOpener.open(path: path, options: .init(writable: false, format: format, lock: false))
        defer { try? device.close() }
        guard let counting = device.driver as? any AllocationCounting else { return XCTFail("\(path): no table count") }
        let size = device.virtualSize
        func both(_ from: UInt64, _ to: UInt64) throws -> (UInt64?, UInt64?) {
            var a = WorkBudget.report, b = WorkBudget.report
            return (try counting.countAllocated(from: from, to: to, budget: &a), try counting.countByStatus(from: from, to: to, budget: &b))
        }
        let (whole, walked) = try both(0, size)
        XCTAssertNotNil(whole, path)
        XCTAssertEqual(whole, walked, "\(path): whole disk")
        XCTAssertGreaterThan(whole ?? 0, 0, path)
        if let qemuFormat { XCTAssertEqual(whole, try qemuData(path, format: qemuFormat), "\(path): against qemu-img map") }
        var rng = SeededRandom(seed: seed)
        for k in 0..<60 {
            // Half the ranges on sector bounds (partitions), half anywhere.
            var a = rng.next() % size, b = rng.next() % size
            if a > b { swap(&a, &b) }
            if k % 2 == 0 { a = a / 512 * 512; b = b / 512 * 512 }
            let (counted, walked) = try both(a, b + 1)
            XCTAssertEqual(counted, walked, "\(path): [\(a), \(b + 1))")
        }
    }

    func convert(_ name: String, _ args: [String]) throws -> String {
        let out = dir + "/" + name
        XCTAssertEqual(try run(["qemu-img", "convert"] + args + [try source(), out]), 0, "qemu-img convert \(args)")
        return out
    }

    func testQCOW2CountsEqualTheWalkAndQemu() throws {
        try check(try convert("a.qcow2", ["-O", "qcow2"]), format: .qcow2, qemuFormat: "qcow2", seed: 1)
        try check(try convert("b.qcow2", ["-O", "qcow2", "-o", "cluster_size=4096"]), format: .qcow2, qemuFormat: "qcow2", seed: 2)
        try check(try convert("c.qcow2", ["-c", "-O", "qcow2"]), format: .qcow2, qemuFormat: "qcow2", seed: 3)
        try check(try convert("d.qcow2", ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"]), format: .qcow2, qemuFormat: "qcow2", seed: 4)
        // Zero-flag clusters and subclusters, and a discard, written by QEMU.
        let z = try convert("e.qcow2", ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=64k"])
        XCTAssertEqual(try run(["qemu-io", "-f", "qcow2", "-c", "write -z 1M 200k", "-c", "discard 5M 1M", "-c", "write -P 3 9M 2k", z]), 0)
        try check(z, format: .qcow2, qemuFormat: "qcow2", seed: 5)
        let y = try convert("f.qcow2", ["-O", "qcow2"])
        XCTAssertEqual(try run(["qemu-io", "-f", "qcow2", "-c", "write -z 1M 2M", "-c", "discard 6M 1M", y]), 0)
        try check(y, format: .qcow2, qemuFormat: "qcow2", seed: 6)
    }

    func testVMDKCountsEqualTheWalkAndQemu() throws {
        try check(try convert("a.vmdk", ["-O", "vmdk"]), format: .vmdk, qemuFormat: "vmdk", seed: 11)
        try check(try convert("b.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]), format: .vmdk, qemuFormat: "vmdk", seed: 12)
        try check(try convert("c.vmdk", ["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"]), format: .vmdk, qemuFormat: "vmdk", seed: 13)
        try check(try convert("d.vmdk", ["-O", "vmdk", "-o", "subformat=monolithicFlat"]), format: .vmdk, qemuFormat: nil, seed: 14)
    }

    func testQEDAndVDICountsEqualTheWalkAndQemu() throws {
        try check(try convert("a.qed", ["-O", "qed"]), format: .qed, qemuFormat: "qed", seed: 31)
        let q = try convert("b.qed", ["-O", "qed", "-o", "cluster_size=4096"])
        XCTAssertEqual(try run(["qemu-io", "-f", "qed", "-c", "write -z 1M 200k", "-c", "write -P 5 7M 3k", q]), 0)
        try check(q, format: .qed, qemuFormat: "qed", seed: 32)
        try check(try convert("a.vdi", ["-O", "vdi"]), format: .vdi, qemuFormat: "vdi", seed: 33)
        try check(try convert("b.vdi", ["-O", "vdi", "-o", "static=on"]), format: .vdi, qemuFormat: "vdi", seed: 34)
    }

    func testRawAndBochsCountsEqualTheWalk() throws {
        let raw = dir + "/a.raw"
        XCTAssertEqual(try run(["cp", "--sparse=always", try source(), raw]), 0)
        try check(raw, format: .raw, qemuFormat: "raw", seed: 21)
        let growing = dir + "/a.img", sparse = dir + "/b.img"
        XCTAssertEqual(try run(["bximage", "-func=convert", "-imgmode=growing", "-q", try source(), growing]), 0)
        try check(growing, format: .bochs, qemuFormat: nil, seed: 22)
        XCTAssertEqual(try run(["bximage", "-func=convert", "-imgmode=sparse", "-q", try source(), sparse]), 0)
        try check(sparse, format: .bochs, qemuFormat: nil, seed: 23)
    }
}
