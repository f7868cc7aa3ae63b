"""Port of richzhang/colorization ``resources/caffe_traininglayers.py`` (the Python training
layers) for the tests and the benchmark: ``NNEncode`` (sklearn ``NearestNeighbors``, ball tree),
``PriorFactor``, and the forward passes of ``NNEncLayer``, ``PriorBoostLayer`` and
``NonGrayMaskLayer`` as the training net wires them (``models/colorization_train_val_v2.prototxt``:
BGR2Lab → ab sampled at stride 4 → encode / boost / grey mask). skimage is not a dependency, so
``rgb2lab`` is a port of skimage ``color.rgb2lab`` (sRGB → XYZ → Lab, D65, 2° observer), float64.
"""
import numpy as np
import sklearn.neighbors as nn

_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb2lab(rgb):
    """skimage ``rgb2xyz`` then ``xyz2lab`` on (..., 3) float data in [0, 1]."""
    arr = np.array(rgb, dtype=np.float64, copy=True)
    mask = arr > 0.04045
    arr[mask] = np.power((arr[mask] + 0.055) / 1.055, 2.4)
    arr[~mask] /= 12.92
    xyz = arr @ _XYZ_FROM_RGB.T
    arr = xyz / _D65
    mask = arr > 0.008856
    arr[mask] = np.cbrt(arr[mask])
    arr[~mask] = 7.787 * arr[~mask] + 16.0 / 116.0
    x, y, z = arr[..., 0], arr[..., 1], arr[..., 2]
    return np.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], axis=-1)


def na():
    return np.newaxis


def flatten_nd_array(pts_nd, axis=1):
    NDIM = pts_nd.ndim
    SHP = np.array(pts_nd.shape)
    nax = np.setdiff1d(np.arange(0, NDIM), np.array((axis)))
    NPTS = np.prod(SHP[nax])
    axorder = np.concatenate((nax, np.array(axis).flatten()), axis=0)
    return pts_nd.transpose((axorder)).reshape(NPTS, SHP[axis])


def unflatten_2d_array(pts_flt, pts_nd, axis=1):
    NDIM = pts_nd.ndim
    SHP = np.array(pts_nd.shape)
    nax = np.setdiff1d(np.arange(0, NDIM), np.array((axis)))
    axorder = np.concatenate((nax, np.array(axis).flatten()), axis=0)
    axorder_rev = np.argsort(axorder)
    NEW_SHP = SHP[nax].tolist()
    NEW_SHP.append(pts_flt.shape[1])
    return pts_flt.reshape(NEW_SHP).transpose(axorder_rev)


class NNEncode:
    """Encode points using NN search and Gaussian kernel."""

    def __init__(self, NN, sigma, cc):
        self.cc = cc
        self.K = self.cc.shape[0]
        self.NN = int(NN)
        self.sigma = sigma
        self.nbrs = nn.NearestNeighbors(n_neighbors=self.NN, algorithm="ball_tree").fit(self.cc)

    def encode_points_mtx_nd(self, pts_nd, axis=1):
        pts_flt = flatten_nd_array(pts_nd, axis=axis)
        P = pts_flt.shape[0]
        (dists, inds) = self.nbrs.kneighbors(pts_flt)
        pts_enc_flt = np.zeros((P, self.K))
        wts = np.exp(-dists ** 2 / (2 * self.sigma ** 2))
        wts = wts / np.sum(wts, axis=1)[:, na()]
        pts_enc_flt[np.arange(0, P, dtype="int")[:, na()], inds] = wts
        return unflatten_2d_array(pts_enc_flt, pts_nd, axis=axis)


class PriorFactor:
    """Class handles prior factor (alpha 1 = divide by the mixed prior)."""

    def __init__(self, alpha, gamma=0, prior_probs=None):
        self.alpha = alpha
        self.gamma = gamma
        self.prior_probs = prior_probs
        self.uni_probs = np.zeros_like(self.prior_probs)
        self.uni_probs[self.prior_probs != 0] = 1.0
        self.uni_probs = self.uni_probs / np.sum(self.uni_probs)
        self.prior_mix = (1 - self.gamma) * self.prior_probs + self.gamma * self.uni_probs
        self.prior_factor = self.prior_mix ** -self.alpha
        self.prior_factor = self.prior_factor / np.sum(self.prior_probs * self.prior_factor)

    def forward(self, data_ab_quant, axis=1):
        data_ab_maxind = np.argmax(data_ab_quant, axis=axis)
        corr_factor = self.prior_factor[data_ab_maxind]
        return corr_factor[:, na(), :]


def nongray_mask(data_ab, thresh=5):
    """NonGrayMaskLayer.forward: 1 if any (a, b) value of the image exceeds the threshold."""
    return (np.sum(np.sum(np.sum(np.abs(data_ab) > thresh, axis=1), axis=1), axis=1) > 0)[:, na(), na(), na()]


class TrainingLayers:
    """The training net's label branch on an (N, 3, X, Y) RGB batch in [0, 1]: returns the dense
    ``gt_ab_313`` (N, 313, x, y), ``prior_boost_nongray`` (N, 1, x, y) and the grey mask (N, 1, 1, 1)."""

    def __init__(self, pts_in_hull, prior_probs, stride=4):
        self.nnenc = NNEncode(10.0, 5.0, pts_in_hull)
        self.pc = PriorFactor(1.0, gamma=0.5, prior_probs=prior_probs)
        self.stride = stride

    def __call__(self, rgb):
        img_lab = rgb2lab(rgb.transpose((2, 3, 0, 1))).transpose((2, 3, 0, 1))   # BGR2LabLayer's layout dance
        data_ab = img_lab[:, 1:]
        data_ab_ss = data_ab[:, :, ::self.stride, ::self.stride]
        gt_ab_313 = self.nnenc.encode_points_mtx_nd(data_ab_ss, axis=1)
        nongray = nongray_mask(data_ab_ss)
        prior_boost = self.pc.forward(gt_ab_313, axis=1)
        return gt_ab_313, prior_boost * nongray, nongray
