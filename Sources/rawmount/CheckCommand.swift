import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check an image's metadata; --repair drops entries that point outside the file or twice at one cluster.",
        discussion: "Exit status: 0 clean, 2 corruption found (and not repaired), 3 only leaked clusters, 63 the format has no check (raw, Bochs; as qemu-img), 1 error." + Examples.section("check"))

    @Flag(help: "Fix what can be fixed (needs exclusive access).")
    var repair = false

    @Option(help: ArgumentHelp("human (default) or json (qemu-img check's keys: filename, format, check-errors, corruptions, leaks, corruptions-fixed, leaks-fixed, allocated-clusters, fragmented-clusters, total-clusters, image-end-offset).", valueName: "format"))
    var output: String = "human"

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    /// What a check found, in qemu-img check's terms.
    struct Outcome {
        var format: String
        var text: String
        var corruptions = 0, leaks = 0, corruptionsFixed = 0, leaksFixed = 0
        var extra: [String: Any] = [:]
    }

    func run() throws {
        guard output == "human" || output == "json" else {
            printError("rawmount: --output \(output): human or json")
            throw ExitCode(1)
        }
        let outcome: Outcome
        do {
            outcome = try check()
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
            throw ExitCode.failure
        }
        if output == "json" {
            var f: [String: Any] = ["filename": image, "format": outcome.format, "check-errors": 0]
            if outcome.corruptions > 0 { f["corruptions"] = outcome.corruptions }
            if outcome.leaks > 0 { f["leaks"] = outcome.leaks }
            if outcome.corruptionsFixed > 0 { f["corruptions-fixed"] = outcome.corruptionsFixed }
            if outcome.leaksFixed > 0 { f["leaks-fixed"] = outcome.leaksFixed }
            f.merge(outcome.extra) { a, _ in a }
            print(QemuImageInfo.json(f))
        } else {
            print("\(image): \(outcome.text)")
            if outcome.corruptions == 0 && outcome.leaks == 0 { print("No errors were found on the image.") }
        }
        if outcome.corruptions > 0 { throw ExitCode(2) }
        if outcome.leaks > 0 { throw ExitCode(3) }
    }

    private func check() throws -> Outcome {
        let file = try ImageFile(path: image, writable: repair)
        try ImageLock.acquire(file, writable: repair)
        switch try ImageFormat.probe(file) {
        case .qed:
            let header = try QEDHeader.read(from: file)
            let report = try QEDCheck.run(file: file, header: header, repair: repair)
            if repair && header.features & QEDHeader.featureNeedCheck != 0 {
                var h = header
                h.features &= ~QEDHeader.featureNeedCheck
                try file.write(h.encoded(), at: 0)
            }
            try file.sync()
            var o = Outcome(format: "qed", text: "\(report)", corruptions: repair ? 0 : report.corruptions, leaks: report.leakedClusters)
            if repair { o.corruptionsFixed = report.repaired; o.leaksFixed = report.releasedClusters }
            let cs = UInt64(header.clusterSize)
            o.extra = ["total-clusters": (header.imageSize + cs - 1) / cs]
            return o
        case .vdi:
            let before = try VDICheck.run(file: file)
            guard repair, before.corruptions > 0 else { return Outcome(format: "vdi", text: "\(before)", corruptions: before.corruptions) }
            // The repair a writable open makes after a crash (blocks_allocated set to what the
            // map holds, blocks above it moved down, orphans cut off); duplicate or
            // out-of-range entries stay for the user to see.
            let header = try VDIHeader.read(from: file)
            guard !header.isDifferencing else {
                throw BlockError.unsupported(file: image, feature: "repairing a VirtualBox differencing image")
            }
            let fixed = try VDIRepair.run(file: file, header: header)
            let after = try VDICheck.run(file: file)
            var o = Outcome(format: "vdi", text: "\(after)" + (fixed.changed ? " (repaired: \(fixed))" : ""), corruptions: after.corruptions)
            o.corruptionsFixed = max(0, before.corruptions - after.corruptions)
            return o
        case .qcow2:
            let header = try QCOW2Header.read(from: file)
            if repair && header.incompatible & QCOW2Header.incompatibleDataFile != 0 {
                throw BlockError.unsupported(file: image, feature: "repairing a qcow2 with an external data file")
            }
            // L2 tables read, on a terminal (stdout too: a script's pipe gets no progress).
            var bar: Progress?
            let report = try QCOW2Check.run(file: file, header: header, repair: repair) { done, total in
                if bar == nil { bar = Progress(total: total, enabled: isatty(STDERR_FILENO) == 1 && isatty(STDOUT_FILENO) == 1 && output == "human") }
                bar?.show(done)
            }
            bar?.finish()
            if repair, report.corruptions == 0, report.leakedClusters == 0 {
                // Consistent again: a dirty (lazy refcounts) or corrupt mark no longer applies.
                let clean = header.incompatible & ~(QCOW2Header.incompatibleDirty | QCOW2Header.incompatibleCorrupt)
                if clean != header.incompatible {
                    try QCOW2Header.writeField(file, at: QCOW2Header.Field.incompatible, clean, bytes: 8)
                    try file.sync()
                }
            }
            var o = Outcome(format: "qcow2", text: "\(report)", corruptions: report.corruptions, leaks: report.leakedClusters)
            if repair { o.corruptionsFixed = report.repairedRefcounts + report.repairedCopied }
            let cs = header.clusterSize
            // The end of the last cluster the file holds: never before a cluster in use, so
            // truncating there (what scripts use it for) keeps everything.
            o.extra = ["total-clusters": (header.size + cs - 1) / cs, "image-end-offset": (try file.size() + cs - 1) / cs * cs]
            // qemu-img's keys, counted as it counts them (the active tables, in guest order).
            if report.allocatedClusters > 0 {
                o.extra["allocated-clusters"] = report.allocatedClusters
                o.extra["fragmented-clusters"] = report.fragmentedClusters
            }
            if report.activeCompressedClusters > 0 { o.extra["compressed-clusters"] = report.activeCompressedClusters }
            return o
        case .vmdk:
            let device = try ImageOpener.open(path: image, options: .init(writable: false, format: .vmdk, lock: false))
            defer { try? device.close() }
            guard let driver = device.driver as? VMDKDriver else { throw ExitCode.failure }
            let report = try VMDKCheck.run(driver)
            if repair && report.corruptions > 0 { printError("rawmount: \(image): VMDK repair is not implemented") }
            return Outcome(format: "vmdk", text: "\(report)", corruptions: report.corruptions)
        case .vhdx:
            // A log to replay first: reported, or replayed by a writable open when repairing.
            let pending = try VHDXCheck.pendingLog(file)
            if pending > 0 && !repair {
                let report = VHDXCheckReport(pendingLogEntries: pending)
                return Outcome(format: "vhdx", text: "\(report)", leaks: 1)
            }
            let device = try ImageOpener.open(path: image, options: .init(writable: repair, format: .vhdx, lock: false))
            defer { try? device.close() }
            guard let driver = device.driver as? VHDXDriver else { throw ExitCode.failure }
            let report = try VHDXCheck.run(driver)
            var o = Outcome(format: "vhdx", text: "\(report)" + (pending > 0 ? " (log of \(pending) replayed)" : ""), corruptions: report.corruptions)
            o.leaksFixed = pending > 0 ? 1 : 0
            return o
        case .vpc:
            let device = try ImageOpener.open(path: image, options: .init(writable: repair, format: .vpc, lock: false))
            defer { try? device.close() }
            guard let driver = device.driver as? VHDDriver else { throw ExitCode.failure }
            let report = try VHDCheck.run(driver)
            var o = Outcome(format: "vpc", text: "\(report)", corruptions: report.corruptions, leaks: report.leaks)
            if repair && report.leaks > 0 {
                try VHDCheck.repairFooter(driver)
                o.leaks = 0; o.leaksFixed = report.leaks
                o.text += " (repaired)"
            }
            o.extra = ["image-end-offset": report.imageEnd + 512]
            return o
        default:
            // qemu-img's answer and exit status for a format without a check (raw, Bochs).
            printError("rawmount: \(image): this image format (\(try ImageFormat.probe(file).rawValue)) does not support checks")
            throw ExitCode(63)
        }
    }
}
