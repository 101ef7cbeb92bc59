import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `backup --verify DIR|FILE`: every point of a chain (up to FILE) exists, opens, is backed
/// by the point before it, has every cluster it holds readable; the disk of the last point
/// hashes to the SHA-256 the manifest recorded for it, when it recorded one.
/// Exit 0 sound, 1 a mismatch or a broken link, 2 unreadable.
struct BackupVerify {
    let path: String
    let json: Bool

    func run() throws {
        var st = stat()
        guard stat(path, &st) == 0 else { throw BlockError.io(file: path, operation: "open", offset: nil, errno: errno) }
        var chains: [(BackupChain, upTo: String?)] = []
        if st.st_mode & S_IFMT == S_IFDIR {
            for name in try PathName.entries(of: path).sorted() where name.hasSuffix(".backup.json") {
                chains.append((try BackupChain.load(folder: path, stem: String(name.dropLast(".backup.json".count))), nil))
            }
            guard !chains.isEmpty else { throw BlockError.usage("\(path): no backup manifest (<stem>.backup.json) in this folder") }
        } else {
            let name = PathName.baseName(path), folder = PathName.directory(of: path)
            guard let stem = [".full.", ".inc."].compactMap({ name.firstRange(of: $0).map { String(name[..<$0.lowerBound]) } }).first else {
                throw BlockError.usage("\(path): not a backup file (<stem>.full.<time>.qcow2 or <stem>.inc.<time>.qcow2)")
            }
            chains.append((try BackupChain.load(folder: folder.isEmpty ? "." : folder, stem: stem), name))
        }
        var problems: [String] = []
        var report: [[String: Any]] = []
        for (chain, upTo) in chains {
            var points = chain.points
            if let upTo {
                guard let i = points.firstIndex(where: { $0.file == upTo }) else {
                    throw BlockError.usage("\(path): not in the chain its manifest lists (\(chain.manifestPath))")
                }
                points = Array(points[...i])
            }
            guard !points.isEmpty else { problems.append("\(chain.manifestPath): no backup listed whose file exists"); continue }
            for (i, p) in points.enumerated() {
                let file = chain.folder + "/" + p.file
                let device = try ImageOpener.open(path: file, options: .init(writable: false, format: .qcow2))
                defer { try? device.close() }
                guard let q = device.driver as? QCOW2Driver else { continue }
                let expected = i == 0 ? nil : points[i - 1].file
                if q.header.backingName != expected {
                    problems.append("\(p.file): backed by \(q.header.backingName ?? "nothing"), the chain says \(expected ?? "nothing")")
                }
                // Every cluster this file holds (not its backing's) is read.
                var pos: UInt64 = 0
                let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
                defer { buf.deallocate() }
                while pos < device.virtualSize {
                    let m = try q.map(pos, maxLength: min(device.virtualSize - pos, 1 << 20))
                    let n = min(max(m.length, 1), device.virtualSize - pos)
                    switch m {
                    case .data, .shared, .compressed: try device.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<Int(n)]), at: pos)
                    default: break
                    }
                    pos += n
                }
                report.append(["file": p.file, "kind": p.kind, "backing": q.header.backingName as Any])
            }
            if let last = points.last, let recorded = last.sha256 {
                let device = try ImageOpener.open(path: chain.folder + "/" + last.file, options: .init(writable: false, format: .qcow2))
                defer { try? device.close() }
                let got = try DiskHasher(device: device, start: 0, length: device.virtualSize).run([.sha256]) { _ in }[.sha256]!
                if got != recorded { problems.append("\(last.file): the restored disk hashes to \(got), the manifest recorded \(recorded)") }
                report[report.count - 1]["sha256"] = got
                report[report.count - 1]["sha256-matches"] = got == recorded
            }
        }
        if json {
            print(QemuImageInfo.json(["path": path, "points": report, "problems": problems, "sound": problems.isEmpty] as [String: Any]))
        } else {
            // File names and kinds come from the manifest: escaped like every string from a file.
            for r in report {
                print("\((r["file"] as! String).escapingControls): \((r["kind"] as! String).escapingControls), readable"
                    + ((r["sha256-matches"] as? Bool) == true ? ", SHA-256 matches" : ""))
            }
            for p in problems { printError("rawmount: \(p.escapingControls)") }
            print(problems.isEmpty ? "rawmount: \(path.escapingControls): chain sound (\(report.count) file(s))" : "rawmount: \(path.escapingControls): chain BROKEN")
        }
        if !problems.isEmpty { throw ExitCode.failure }
    }
}
