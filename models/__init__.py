"""Networks of the project. ``models`` imports only torch (and torchvision for the ImageNet net)."""
from models.resnet import ImageNetResNet18, cifar_resnet


def build_model(model, num_classes, mean, std, width=64, maxpool=True, imagenet=False):
    if imagenet:
        if model != "resnet18":
            raise ValueError("only resnet18 is provided for the ImageNet subset")
        return ImageNetResNet18(num_classes, mean, std, width)
    return cifar_resnet(model, num_classes, mean, std, width, maxpool)


def get_network(args, num_classes=None, maxpool=True):
    """The classifier named by args (--model, --width and the dataset facts that
    utils.args.validate_args derives from --dataset). num_classes=0 drops the head."""
    n = args.num_classes if num_classes is None else num_classes
    return build_model(args.model, n, args.mean, args.std, args.width, maxpool, args.dataset == "imagenet")
