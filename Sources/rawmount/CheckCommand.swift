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
        discussion: "Exit status: 0 clean, 2 corruption found (and not repaired), 3 only leaked clusters, 63 the format has no check (raw, Bochs; as qemu-img), 1 error.")

    @Flag(help: "Fix what can be fixed (needs exclusive access).")
    var repair = false

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    func run() throws {
        do {
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
                print("\(image): \(report)")
                if report.corruptions > 0 && !repair { throw ExitCode(2) }
                if report.leakedClusters > 0 { throw ExitCode(3) }
                print("No errors were found on the image.")
            case .vdi:
                let report = try VDICheck.run(file: file)
                print("\(image): \(report)")
                if report.corruptions > 0 {
                    if repair { printError("rawmount: \(image): VDI repair is not implemented") }
                    throw ExitCode(2)
                }
                print("No errors were found on the image.")
            case .qcow2:
                let header = try QCOW2Header.read(from: file)
                if repair && header.incompatible & QCOW2Header.incompatibleDataFile != 0 {
                    throw BlockError.unsupported(file: image, feature: "repairing a qcow2 with an external data file")
                }
                let report = try QCOW2Check.run(file: file, header: header, repair: repair)
                if repair, report.corruptions == 0, report.leakedClusters == 0 {
                    // Consistent again: a dirty (lazy refcounts) or corrupt mark no longer applies.
                    let clean = header.incompatible & ~(QCOW2Header.incompatibleDirty | QCOW2Header.incompatibleCorrupt)
                    if clean != header.incompatible {
                        try QCOW2Header.writeField(file, at: QCOW2Header.Field.incompatible, clean, bytes: 8)
                        try file.sync()
                    }
                }
                print("\(image): \(report)")
                if report.corruptions > 0 { throw ExitCode(2) }
                if report.leakedClusters > 0 { throw ExitCode(3) }
                print("No errors were found on the image.")
            case .vmdk:
                let device = try ImageOpener.open(path: image, options: .init(writable: false, format: .vmdk, lock: false))
                defer { try? device.close() }
                guard let driver = device.driver as? VMDKDriver else { throw ExitCode.failure }
                let report = try VMDKCheck.run(driver)
                print("\(image): \(report)")
                if repair && report.corruptions > 0 { printError("rawmount: \(image): VMDK repair is not implemented") }
                if report.corruptions > 0 { throw ExitCode(2) }
                print("No errors were found on the image.")
            case .raw, .bochs:
                // qemu-img's answer and exit status for a format without a check.
                printError("rawmount: \(image): this image format (\(try ImageFormat.probe(file).rawValue)) does not support checks")
                throw ExitCode(63)
            }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }
}
